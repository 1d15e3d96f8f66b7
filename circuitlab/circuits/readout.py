"""Read the channel-level circuit behind a decision (the paper's readout, plus gradients).

>>> c = read_circuit(hm, x, explanation=ex.explanation, k=16)
>>> c.nodes.head(), c.edges.sort_values("score").tail()

Nodes: per tapped layer, the units with the largest energy E_c = ||phi_c(e)||_2 over space
(``select="energy"``, the paper) or attribution |sum_pos phi_c * d logit_y / d phi_c|
(``select="attribution"``), chosen by top-k or by cumulative mass. Edges join consecutive
layers and the last one to the pooled features: ||W_{d,s}||_1 x E_s where one conv or linear
layer lies between them (``edges="weight"``, the paper; grouped and depthwise convolutions
are block-diagonal), the ingress weight through the path where blocks lie between them
(kind ``path``: residual, inverted-residual and downsample blocks composed from their
absolute weights, ``paths``), else the linearised effective contribution
(``edges="effective"``, see ``_effective_chain``); transformer heads and MLP neurons are
joined by virtual weights through the residual stream (``transformer``); ``gradient=True``
multiplies each edge by the destination's mean |d logit_y / d phi_d|. Feature-to-class links
|W_fc[y, j]| * |h_j| join the pooled features to the top classes. ``select="learned"``
chooses a budget of all tapped units together (``learned``). Effective edges of every pair
come from one batched backward where the taps cut the network (``_effective_chain``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..errors import CircuitlabError
from ..hooked_model import HookedModel
from . import edges as E
from . import paths as P
from . import transformer as T
from .circuit import Circuit
from .learned import learn_units


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


def _run_copies(hm: HookedModel, x: torch.Tensor, k: int, names: Sequence[str], srcs,
                late: bool = True) -> tuple[dict, dict]:
    """Run ``k`` copies of x with every source in ``srcs`` replaced by a detached leaf:
    ({name: activation}, {source: leaf}).

    The copies only differ in what is back-propagated, so with ``late`` the layers before
    the first source run once and the batch is expanded there (on a CPU, where a batch of k
    costs k times one image, that saves the whole front of the network k - 1 times); a
    model that fixed its batch size earlier in its forward falls back to k copies of x."""
    held, leaves = {}, {}

    def hook(act, name):
        held[name] = act
        if name in srcs:
            leaf = act.detach()
            if leaf.shape[0] != k:
                leaf = leaf.expand(k, *leaf.shape[1:]).contiguous()
            leaves[name] = leaf.requires_grad_(True)
            return leaves[name]
        return act
    if late:
        try:
            hm.run_with_hooks(x, [(n, hook) for n in names])
            if all(t.shape[0] == k for n, t in held.items() if n not in srcs):
                return held, leaves
        except Exception:  # noqa: BLE001 -- any failure means: run the safe way
            pass
        held.clear()
        leaves.clear()
    hm.run_with_hooks(x.expand(k, *x.shape[1:]), [(n, hook) for n in names])
    return held, leaves


def _ordered(hm: HookedModel, names) -> list:
    order = {n: i for i, n in enumerate(hm.hook_points)}
    return sorted(dict.fromkeys(names), key=lambda n: order.get(n, len(order)))


@torch.no_grad()
def _effective(hm: HookedModel, x: torch.Tensor, src: str, dst: str,
               dst_units: Sequence[int]) -> torch.Tensor:
    """(len(dst_units), src units): |sum_pos dD_d/dA_s * A_s| for each chosen destination."""
    hs, hd = hm.point(src), hm.point(dst)
    k = len(dst_units)
    with torch.enable_grad():
        held, leaves = _run_copies(hm, x, k, _ordered(hm, [src, dst]), {src})
        d = per_unit(held[dst], hd.unit_axis)                     # (k, U_d, P)
        pick = d[torch.arange(k), torch.as_tensor(list(dst_units))].sum()
        (g,) = torch.autograd.grad(pick, leaves[src])
    a = leaves[src].detach()
    return (per_unit(g * a, hs.unit_axis).sum(-1)).abs()          # (k, U_s)


def _leaves(t: torch.Tensor) -> set:
    """ids of the leaf tensors that ``t``'s autograd graph reaches."""
    out, seen, stack = set(), set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if var is not None:
            out.add(id(var))
            continue
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return out


@torch.no_grad()
def _effective_chain(hm: HookedModel, x: torch.Tensor, pairs) -> dict:
    """{(src, dst): (len(dst_units), src units)} effective edges for every pair at once.

    One forward of k copies of x (k = the most destination units of any pair) in which every
    source's output is replaced by a detached leaf, and one backward of the sum of all picked
    destinations: where each destination depends on no leaf but its own source (the tapped
    layers cut the network, as stage and block outputs do), the gradient at each source comes
    from its own destination alone and equals ``_effective``. Pairs that fail that check (a
    skip connection around a tap) are computed one at a time with ``_effective``.
    """
    k = max(len(u) for _, _, u in pairs)
    srcs = {s for s, _, _ in pairs}
    names = _ordered(hm, [n for s, d, _ in pairs for n in (s, d)])
    out, loose = {}, []
    with torch.enable_grad():
        held, leaves = _run_copies(hm, x, k, names, srcs)
        total, used = 0, []
        for src, dst, units in pairs:
            if _leaves(held[dst]) != {id(leaves[src])}:
                loose.append((src, dst, units))
                continue
            d = per_unit(held[dst], hm.point(dst).unit_axis)            # (k, U_d, P)
            n = len(units)
            total = total + d[torch.arange(n), torch.as_tensor(list(units))].sum()
            used.append((src, dst, n))
        if used:
            srcs_used = list(dict.fromkeys(s for s, _, _ in used))
            grads = dict(zip(srcs_used, torch.autograd.grad(total, [leaves[s]
                                                                      for s in srcs_used])))
            for src, dst, n in used:
                ga = grads[src] * leaves[src].detach()
                out[(src, dst)] = per_unit(ga, hm.point(src).unit_axis).sum(-1).abs()[:n]
    for src, dst, units in loose:
        out[(src, dst)] = _effective(hm, x, src, dst, units)
    return out


def node_layers(hm: HookedModel, layers: Optional[Sequence[str]] = None,
                units: str = "auto") -> list:
    """The hook points whose units become nodes: ``layers`` as given, else the model's taps,
    or on ViTs (``units`` auto / components) their heads and MLP neurons."""
    if units not in ("auto", "components", "channels"):
        raise CircuitlabError("units must be 'auto', 'components' or 'channels'")
    if layers is None and units != "channels" and (units == "components" or
                                                    hm.family.name == "vit"):
        comps = T.component_layers(hm.hook_points, hm.taps)
        if comps:
            layers = comps
        elif units == "components":
            raise CircuitlabError(f"{hm.name}'s taps are not transformer blocks with heads and "
                                  f"MLP neurons; use units='channels' (--units channels)")
    layers = list(layers or hm.taps)
    for name in layers:
        if hm.point(name).unit_axis is None:
            raise CircuitlabError(f"layer {name!r} has no unit axis to read nodes from")
    return layers


def read_circuit(hm: HookedModel, x: torch.Tensor, explanation: Optional[torch.Tensor] = None,
                 target: Optional[int] = None, *, layers: Optional[Sequence[str]] = None,
                 k: int = 16, mass: Optional[float] = None, select_by: str = "energy",
                 edges: str = "auto", gradient: bool = False, top_classes: int = 3,
                 features_per_class: int = 3, units: str = "auto", budget: float = 0.1,
                 reference: Optional[torch.Tensor] = None, method: str = "mean",
                 steps: int = 300) -> Circuit:
    """The circuit of one image: read on ``explanation`` when given (the paper), else on x.

    ``units``: ``"components"`` reads a transformer's tapped blocks as attention heads and
    MLP neurons (``blocks.i.attn.hook_z``, ``blocks.i.mlp.hook_post``) joined by virtual
    weights through the residual stream (``circuits.transformer``); ``"channels"`` reads the
    layers' own units (residual channels of a ViT block); ``"auto"`` is components for ViTs
    when ``layers`` is not given, channels otherwise.

    ``select_by="learned"`` chooses ``budget`` of all tapped units together by optimising
    gates under ``method`` ablation of the rest (``reference`` images for the mean; ``steps``
    Adam steps; ``circuits.learned``) instead of top-k per layer."""
    x = hm.check_input(x)
    if x.shape[0] != 1:
        raise CircuitlabError(f"read_circuit reads one image at a time, got a batch of "
                              f"{x.shape[0]}")
    inp = hm.check_input(explanation) if explanation is not None else x
    if select_by not in ("energy", "attribution", "learned"):
        raise CircuitlabError("select_by must be 'energy', 'attribution' or 'learned'")
    if edges not in ("auto", "weight", "effective", "none"):
        raise CircuitlabError("edges must be 'auto', 'weight', 'effective' or 'none' (nodes "
                              "only)")
    layers = node_layers(hm, layers, units)
    if target is None and explanation is not None:
        target = int(hm(x).argmax(-1))  # the image's decision, read on its explanation
    # weight edges where the modules between two taps compose (a conv, or the path weight
    # through blocks: ``paths``), checked against this run below; the pooled features are
    # one more destination, reached from the last tap through the head's modules
    fc = hm.model.get_submodule(hm.classifier) if hm.classifier else None
    pairs = list(zip(layers, layers[1:])) if edges != "none" else []
    if isinstance(fc, nn.Linear) and edges != "none":
        pairs.append((layers[-1], "hook_pooled"))
    chains = {}
    if edges in ("auto", "weight"):
        for src, dst in pairs:
            if T.component_of(src) and T.component_of(dst):
                continue                       # virtual weights through the residual stream
            pooled = dst == "hook_pooled"
            chain = P.module_chain(hm.model, src, None if pooled else dst,
                                   stop_before=hm.classifier if pooled else None)
            if chain and all(n in hm.hook_points for n in P.chain_hooks(chain)):
                chains[(src, dst)] = chain
    extra = list(dict.fromkeys(n for c in chains.values() for n in P.chain_hooks(c)))
    logits, cache = hm.run_with_cache(inp, names=list(dict.fromkeys(
        layers + ["hook_pooled"] + extra)), grads=True, target=target)
    if target is None:  # read on x itself: its top-1, from this same run
        target = int(cache.target[0])
    learned = learn_units(hm, inp, layers, budget, target=target, method=method,
                          reference=reference, steps=steps) if select_by == "learned" else None
    node_rows, energies, dscale, chosen = [], {}, {}, {}
    for name in layers:
        ax = hm.point(name).unit_axis
        a, g = per_unit(cache[name], ax)[0], per_unit(cache.grad(name), ax)[0]   # (U, P)
        energy = a.norm(dim=-1)
        attribution = (a * g).sum(-1).abs()
        en_list, attr_list = energy.tolist(), attribution.tolist()
        energies[name], dscale[name] = energy, g.abs().mean(-1)
        if learned is not None:   # strongest first, like the other selections
            picked = sorted(learned[name], key=lambda u: -attr_list[u])
        else:
            picked = select(energy if select_by == "energy" else attribution, k, mass)
        chosen[name] = picked
        comp = T.component_of(name)
        node_rows += [{"layer": name, "unit": u, "energy": en_list[u],
                       "attribution": attr_list[u],
                       "kind": comp[1] if comp else "unit"} for u in picked]

    # how each pair of layers is joined: weight (one conv / linear), path (composed through
    # blocks), virtual (transformer components), else effective (gradient x activation)
    plan = {}
    for src, dst in pairs:
        how, w = edges, None
        if edges != "effective" and T.component_of(src) and T.component_of(dst):
            how = "virtual"
        elif edges in ("auto", "weight"):
            chain = chains.get((src, dst))
            got = P.path_weight(hm.model, chain, hm.n_units(src)) \
                if chain and P.verify(cache, src, chain, dst) else None
            if got is not None and got[0].shape[0] == hm.n_units(dst):
                how, w = ("weight", got[1]) if got[1] is not None else ("path", got[0])
            elif edges == "weight" and dst != "hook_pooled":
                raise CircuitlabError(f"the modules between {src} and {dst} do not compose "
                                      f"into a weight (a gate, attention or a branch that "
                                      f"skips a tap); use edges='effective'")
            else:
                how = "effective"
        plan[(src, dst)] = (how, w)

    # pooled features -> classes
    edge_rows, head_rows, features = [], [], []
    if isinstance(fc, nn.Linear):
        h = cache["hook_pooled"][0].flatten()
        top = logits[0].topk(min(top_classes, logits.shape[-1])).indices.tolist()
        class_rows = []
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
                head_rows.append({"src_layer": "hook_pooled", "src_unit": j,
                                  "dst_layer": "hook_logits", "dst_unit": y,
                                  "weight_l1": float(fc.weight[y, j].abs()),
                                  "src_energy": float(h[j].abs()),
                                  "score": float(contrib[j]), "kind": "feature_class"})
        node_rows += class_rows

    chosen["hook_pooled"] = features
    energies["hook_pooled"] = cache["hook_pooled"][0].flatten().abs()
    if gradient:
        dscale["hook_pooled"] = cache.grad("hook_pooled")[0].flatten().abs()
    # every effective edge from one batched forward and backward where the taps cut the
    # network in a chain
    eff_pairs = [(src, dst, chosen[dst]) for (src, dst), (how, _) in plan.items()
                 if how == "effective" and chosen[dst]]
    effective = _effective_chain(hm, inp, eff_pairs) if eff_pairs else {}

    for (src, dst), (how, w) in plan.items():
        if not chosen[dst]:
            continue
        s_idx, d_idx = torch.as_tensor(chosen[src]), torch.as_tensor(chosen[dst])
        scale = dscale.get(dst) if gradient else None
        if how in ("weight", "path"):
            if how == "weight":
                wl, sc = E.scores(w, energies[src], chosen[src], chosen[dst], scale)
            else:
                wl, sc = E.weight_scores(w, energies[src], chosen[src], chosen[dst], 1, scale)
        elif how == "virtual":
            wl = T.virtual_l1(hm.model, src, dst, chosen[src], chosen[dst]).to(
                energies[src].device)
            sc = wl * energies[src][s_idx][None, :]
            if scale is not None:
                sc = sc * scale[d_idx][:, None]
        else:
            eff = effective[(src, dst)][:, s_idx]
            sc = eff * (scale[d_idx][:, None] if scale is not None else 1)
            wl = torch.full_like(eff, float("nan"))
        # one device-to-host copy per table, not one per number (each is a sync on a GPU)
        wl, sc, es = wl.tolist(), sc.tolist(), energies[src].tolist()
        for i, d in enumerate(chosen[dst]):
            for j, s in enumerate(chosen[src]):
                edge_rows.append({"src_layer": src, "src_unit": s, "dst_layer": dst,
                                  "dst_unit": d, "weight_l1": wl[i][j], "src_energy": es[s],
                                  "score": sc[i][j], "kind": how})
    if edges != "none":
        edge_rows += head_rows
    meta = {"model": hm.name, "target": int(target), "label": hm.label(int(target)),
            "read_on": "explanation" if explanation is not None else "image",
            "select_by": select_by, "gradient": bool(gradient), "layers": ",".join(layers),
            **({"budget": float(budget), "method": method} if learned is not None else {})}
    return Circuit(node_rows, edge_rows, meta)
