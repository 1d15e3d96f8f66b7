"""Read the channel-level circuit behind a decision (the paper's readout, plus gradients).

>>> c = read_circuit(hm, x, explanation=ex.explanation, k=16)
>>> c.nodes.head(), c.edges.sort_values("score").tail()

Nodes: per tapped layer, the units with the largest energy E_c = ||phi_c(e)||_2 over space
(``select="energy"``, the paper) or attribution |sum_pos phi_c * d logit_y / d phi_c|
(``select="attribution"``), chosen by top-k or by cumulative mass. Edges join consecutive
layers: ||W_{d,s}||_1 x E_s where the destination layer begins with a conv or linear layer
reading the source's units (``edges="weight"``; grouped and depthwise convolutions are
block-diagonal), else the linearised effective contribution (``edges="effective"``, see
``edges.effective_edges``); ``gradient=True`` multiplies each edge by the destination's mean
|d logit_y / d phi_d|. Feature-to-class links |W_fc[y, j]| * |h_j| join the pooled features to
the top classes.
"""
from __future__ import annotations

from typing import Optional, Sequence

import pandas as pd
import torch
from torch import nn

from ..errors import CircuitlabError
from ..hooked_model import HookedModel
from . import edges as E
from .circuit import Circuit


def per_unit(t: torch.Tensor, axis: int) -> torch.Tensor:
    """(B, U, rest) view of an activation with its units on axis 1."""
    t = t.movedim(axis, 1)
    return t[..., None] if t.dim() == 2 else t.flatten(2)


def select(scores: torch.Tensor, k: Optional[int] = None,
           mass: Optional[float] = None) -> list[int]:
    """Indices of the top-``k`` scores, or of the fewest scores holding ``mass`` of the total."""
    order = scores.argsort(descending=True)
    if mass is not None:
        if not 0 < mass <= 1:
            raise CircuitlabError("mass must lie in (0, 1]")
        cum = scores[order].cumsum(0) / scores.sum().clamp_min(1e-12)
        n = int((cum < mass).sum().item()) + 1
        return order[:min(n, len(order))].tolist()
    return order[:min(k or 16, len(order))].tolist()


@torch.no_grad()
def _effective(hm: HookedModel, x: torch.Tensor, src: str, dst: str,
               dst_units: Sequence[int]) -> torch.Tensor:
    """(len(dst_units), src units): |sum_pos dD_d/dA_s * A_s| for each chosen destination."""
    hs, hd = hm.point(src), hm.point(dst)
    k = len(dst_units)
    held = {}

    def grab_src(act, _name):
        leaf = act.detach().requires_grad_(True)
        held["src"] = leaf
        return leaf

    def grab_dst(act, _name):
        held["dst"] = act
        return act
    with torch.enable_grad():
        hm.run_with_hooks(x.expand(k, *x.shape[1:]), [(src, grab_src), (dst, grab_dst)])
        d = per_unit(held["dst"], hd.unit_axis)                     # (k, U_d, P)
        pick = d[torch.arange(k), torch.as_tensor(list(dst_units))].sum()
        (g,) = torch.autograd.grad(pick, held["src"])
    a = held["src"].detach()
    return (per_unit(g * a, hs.unit_axis).sum(-1)).abs()          # (k, U_s)


def read_circuit(hm: HookedModel, x: torch.Tensor, explanation: Optional[torch.Tensor] = None,
                 target: Optional[int] = None, *, layers: Optional[Sequence[str]] = None,
                 k: int = 16, mass: Optional[float] = None, select_by: str = "energy",
                 edges: str = "auto", gradient: bool = False, top_classes: int = 3,
                 features_per_class: int = 3) -> Circuit:
    """The circuit of one image: read on ``explanation`` when given (the paper), else on x."""
    x = hm.check_input(x)
    if x.shape[0] != 1:
        raise CircuitlabError(f"read_circuit reads one image at a time, got a batch of "
                              f"{x.shape[0]}")
    inp = hm.check_input(explanation) if explanation is not None else x
    if select_by not in ("energy", "attribution"):
        raise CircuitlabError("select_by must be 'energy' or 'attribution'")
    if edges not in ("auto", "weight", "effective"):
        raise CircuitlabError("edges must be 'auto', 'weight' or 'effective'")
    layers = list(layers or hm.taps)
    for name in layers:
        if hm.point(name).unit_axis is None:
            raise CircuitlabError(f"layer {name!r} has no unit axis to read nodes from")
    if target is None and explanation is not None:
        target = int(hm(x).argmax(-1))  # the image's decision, read on its explanation
    # weight edges only where the destination's first conv / linear reads exactly the
    # source's output (checked on this run), so a same-width layer further on (a ViT block,
    # a stage after an untapped one) falls back to effective edges
    ingress = {}
    if edges in ("auto", "weight"):
        for src, dst in zip(layers, layers[1:]):
            try:
                path, mod = E.first_weight_layer(hm.model, hm.point(dst).module)
                if f"{path}.hook_in" in hm.hook_points:
                    ingress[dst] = (path, mod)
            except CircuitlabError:
                pass
    extra = [f"{p}.hook_in" for p, _ in ingress.values()]
    logits, cache = hm.run_with_cache(inp, names=layers + ["hook_pooled"] + extra,
                                      grads=True, target=target)
    if target is None:  # read on x itself: its top-1, from this same run
        target = int(cache.target[0])
    node_rows, energies, dscale, chosen = [], {}, {}, {}
    for name in layers:
        ax = hm.point(name).unit_axis
        a, g = per_unit(cache[name], ax)[0], per_unit(cache.grad(name), ax)[0]   # (U, P)
        energy = a.norm(dim=-1)
        attribution = (a * g).sum(-1).abs()
        energies[name], dscale[name] = energy, g.abs().mean(-1)
        units = select(energy if select_by == "energy" else attribution, k, mass)
        chosen[name] = units
        node_rows += [{"layer": name, "unit": u, "energy": float(energy[u]),
                       "attribution": float(attribution[u]), "kind": "unit"} for u in units]

    edge_rows = []
    for src, dst in zip(layers, layers[1:]):
        how = edges
        if edges in ("auto", "weight"):
            path, mod = ingress.get(dst, (None, None))
            direct = mod is not None and cache[f"{path}.hook_in"].shape == cache[src].shape \
                and torch.equal(cache[f"{path}.hook_in"], cache[src])
            if direct:
                how = "weight"
            elif edges == "weight":
                raise CircuitlabError(f"{dst} does not begin with a conv or linear layer "
                                      f"reading {src}'s output; use edges='effective'")
            else:
                how = "effective"
        if how == "weight":
            wl, sc = E.scores(mod, energies[src], chosen[src], chosen[dst],
                              dscale[dst] if gradient else None)
        else:
            eff = _effective(hm, inp, src, dst, chosen[dst])[:, torch.as_tensor(chosen[src])]
            sc = eff * (dscale[dst][torch.as_tensor(chosen[dst])][:, None] if gradient else 1)
            wl = torch.full_like(eff, float("nan"))
        for i, d in enumerate(chosen[dst]):
            for j, s in enumerate(chosen[src]):
                edge_rows.append({"src_layer": src, "src_unit": s, "dst_layer": dst,
                                  "dst_unit": d, "weight_l1": float(wl[i, j]),
                                  "src_energy": float(energies[src][s]),
                                  "score": float(sc[i, j]), "kind": how})

    # pooled features -> classes
    fc = hm.model.get_submodule(hm.classifier) if hm.classifier else None
    if isinstance(fc, nn.Linear):
        h = cache["hook_pooled"][0].flatten()
        top = logits[0].topk(min(top_classes, logits.shape[-1])).indices.tolist()
        class_rows, features = [], []
        for y in top:
            contrib = fc.weight.detach()[y].abs() * h.abs()
            feats = contrib.topk(min(features_per_class, len(h))).indices.tolist()
            class_rows.append({"layer": "hook_logits", "unit": y,
                               "energy": float(logits[0, y]), "attribution": float("nan"),
                               "kind": "class"})
            for j in feats:
                if j not in features:
                    features.append(j)
                    node_rows.append({"layer": "hook_pooled", "unit": j, "energy": float(h[j]),
                                      "attribution": float("nan"), "kind": "feature"})
                edge_rows.append({"src_layer": "hook_pooled", "src_unit": j,
                                  "dst_layer": "hook_logits", "dst_unit": y,
                                  "weight_l1": float(fc.weight[y, j].abs()),
                                  "src_energy": float(h[j].abs()),
                                  "score": float(contrib[j]), "kind": "feature_class"})
        node_rows += class_rows
        # the last tapped layer feeds the pooled features through the head (conv_head, pool):
        # effective edges, whatever lies between
        last = layers[-1]
        eff = _effective(hm, inp, last, "hook_pooled", features)[:, torch.as_tensor(
            chosen[last])]
        for i, j in enumerate(features):
            for n, s in enumerate(chosen[last]):
                edge_rows.append({"src_layer": last, "src_unit": s, "dst_layer": "hook_pooled",
                                  "dst_unit": j, "weight_l1": float("nan"),
                                  "src_energy": float(energies[last][s]),
                                  "score": float(eff[i, n]), "kind": "effective"})
    nodes = pd.DataFrame(node_rows)
    meta = {"model": hm.name, "target": int(target), "label": hm.label(int(target)),
            "read_on": "explanation" if explanation is not None else "image",
            "select_by": select_by, "gradient": bool(gradient)}
    return Circuit(nodes, pd.DataFrame(edge_rows), meta)
