"""Read the circuit behind a decision: by default the smallest faithful one.

>>> c = read_circuit(hm, x, reference=refs)                     # smallest faithful circuit
>>> c = read_circuit(hm, x, explanation=ex.explanation, select_by="energy", k=16)  # the paper
>>> c.nodes.head(), c.edges.sort_values("score").tail(), c.meta["search_fraction"]

Nodes (``ReadoutConfig.select_by``): by default the fewest units of all tapped layers
together whose circuit keeps ``faithfulness`` of the image-vs-reference contrast with top-1
kept (``search``); or per tapped layer the units with the largest energy E_c =
||phi_c(e)||_2 over space (``energy``, the paper: descriptive, not faithful) or attribution
|sum_pos phi_c * d logit_y / d phi_c| (``attribution``), chosen by top-k or by cumulative
mass; or a budget learned by gates (``learned``). Edges join consecutive
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
come from one batched backward where the taps cut the network (``effective``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..deprecations import renamed
from ..errors import CircuitlabError
from ..hooked_model import HookedModel
from . import edges as E
from . import paths as P
from . import transformer as T
from .circuit import Circuit
from .config import ReadoutConfig
from .edge_circuit import EdgeSearch, smallest_edge_circuit
from .effective import effective_edges
from .learned import learn_units
from .search import SizeSearch, prepare, smallest_faithful

__all__ = ["ReadoutConfig", "node_layers", "read_circuit", "select"]


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


def node_layers(hm: HookedModel, layers: Optional[Sequence[str]] = None,
                units: str = "auto") -> list:
    """The hook points whose units become nodes: ``layers`` as given, else the model's taps,
    or on ViTs (``units`` auto / components) their heads and MLP neurons."""
    if units not in ("auto", "components", "channels"):
        raise CircuitlabError("units must be 'auto', 'components' or 'channels'")
    if layers is None and units != "channels" and (units == "components" or
                                                    hm.family.transformer):
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


@renamed(method="ablation")
def read_circuit(hm: HookedModel, x: torch.Tensor, explanation: Optional[torch.Tensor] = None,
                 target: Optional[int] = None, *, config: Optional[ReadoutConfig] = None,
                 reference: Optional[torch.Tensor] = None,
                 progress: Optional[Callable[[int, int], None]] = None,
                 **settings) -> Circuit:
    """The circuit of one image: read on ``explanation`` when given (the paper), else on x.

    ``config`` (a ``ReadoutConfig``) and keyword ``settings`` (its fields: ``select_by``,
    ``faithfulness``, ``k``, ``mass``, ``edges``, ``units``, ``layers``, ...) say how.
    ``reference`` images define the mean ablation and the contrast of the faithful and
    learned selections; ``progress(step, steps)`` follows the learned selection's steps.

    ``units``: ``"components"`` reads a transformer's tapped blocks as attention heads and
    MLP neurons (``blocks.i.attn.hook_z``, ``blocks.i.mlp.hook_post``) joined by virtual
    weights through the residual stream (``circuits.transformer``); ``"channels"`` reads the
    layers' own units (residual channels of a ViT block); ``"auto"`` is components for ViTs
    when ``layers`` is not given, channels otherwise."""
    cfg = (config or ReadoutConfig()).replace(**settings)
    r = _start(hm, x, explanation, target, cfg)
    _choose_units(r, reference, progress)
    head_rows, class_rows = _class_links(r)
    if cfg.edges == "attribution":
        edge_rows = _edge_circuit_rows(r)
    else:
        edge_rows = _edge_rows(r, _plan_edges(r))
    if cfg.edges != "none":
        edge_rows += head_rows
    return Circuit(r.node_rows + class_rows, edge_rows, _meta(r))


@dataclass
class _Reading:
    """What the phases of one readout hand on to each other."""

    hm: HookedModel
    cfg: ReadoutConfig
    inp: torch.Tensor               # what the circuit is read on (the image, or its explanation)
    on_explanation: bool
    layers: list
    pairs: list                     # consecutive (src, dst) layers joined by edges
    chains: dict                    # (src, dst) -> module chain where weights may compose
    logits: torch.Tensor            # of the run on inp
    cache: object                   # its activations and gradients at the layers
    target: int
    fc: Optional[nn.Module]         # the linear head, when there is one
    chosen: dict = field(default_factory=dict)      # layer -> units, strongest first
    energies: dict = field(default_factory=dict)
    dscale: dict = field(default_factory=dict)      # layer -> mean |d logit / d unit|
    node_rows: list = field(default_factory=list)
    search: Optional[SizeSearch] = None
    edge_search: Optional[EdgeSearch] = None
    classes: list = field(default_factory=list)     # the top classes: unit, label, prob


def _start(hm, x, explanation, target, cfg: ReadoutConfig) -> _Reading:
    """Check the inputs, pick the layers and the pairs to join, and run the image once with
    gradients (the energies, attributions and edge weights all come from this run)."""
    x = hm.check_input(x)
    if x.shape[0] != 1:
        raise CircuitlabError(f"read_circuit reads one image at a time, got a batch of "
                              f"{x.shape[0]}")
    inp = hm.check_input(explanation) if explanation is not None else x
    layers = node_layers(hm, cfg.layers, cfg.units)
    if target is None and explanation is not None:
        target = int(hm(x).argmax(-1))  # the image's decision, read on its explanation
    # weight edges where the modules between two taps compose (a conv, or the path weight
    # through blocks: ``paths``), checked against this run below; the pooled features are
    # one more destination, reached from the last tap through the head's modules
    fc = hm.model.get_submodule(hm.classifier) if hm.classifier else None
    pairs = list(zip(layers, layers[1:])) if cfg.edges != "none" else []
    if isinstance(fc, nn.Linear) and cfg.edges != "none":
        pairs.append((layers[-1], "hook_pooled"))
    chains = {}
    if cfg.edges in ("auto", "weight"):
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
    return _Reading(hm, cfg, inp, explanation is not None, layers, pairs, chains, logits,
                    cache, int(target), fc if isinstance(fc, nn.Linear) else None)


def _choose_units(r: _Reading, reference: Optional[torch.Tensor], progress=None) -> None:
    """The units of each layer (strongest first) and their node rows."""
    cfg, hm = r.cfg, r.hm
    picked_by = None
    if cfg.edges == "attribution":
        picked_by = _edge_circuit(r, reference)
    elif cfg.select_by == "faithful":
        r.search = smallest_faithful(
            hm, r.inp, r.layers, reference, target=r.target, faithfulness=cfg.faithfulness,
            ablation=cfg.ablation, prune=cfg.prune, tolerance=cfg.tolerance,
            refine_steps=cfg.refine_steps, rank_by=cfg.rank_by, ig_steps=cfg.ig_steps)
        picked_by = r.search.units
    elif cfg.select_by == "learned":
        picked_by = learn_units(hm, r.inp, r.layers, cfg.budget, target=r.target,
                                ablation=cfg.ablation, reference=reference, steps=cfg.steps,
                                progress=progress)
    elif cfg.k is not None and cfg.k > max(hm.n_units(n) for n in r.layers):
        widest = max(r.layers, key=hm.n_units)
        raise CircuitlabError(f"k={cfg.k} is more units than any tapped layer has (the widest, "
                              f"{widest}, has {hm.n_units(widest)}): every unit would be the "
                              f"circuit; choose a k below the layers' widths")
    for name in r.layers:
        hp = hm.point(name)
        a, g = hp.per_unit(r.cache[name])[0], hp.per_unit(r.cache.grad(name))[0]   # (U, P)
        energy = a.norm(dim=-1)
        attribution = (a * g).sum(-1).abs()
        en_list, attr_list = energy.tolist(), attribution.tolist()
        r.energies[name], r.dscale[name] = energy, g.abs().mean(-1)
        if picked_by is not None:   # strongest first, like the other selections
            picked = sorted(picked_by[name], key=lambda u: -attr_list[u])
        else:
            picked = select(energy if cfg.select_by == "energy" else attribution, cfg.k,
                            cfg.mass)
        r.chosen[name] = picked
        comp = T.component_of(name)
        r.node_rows += [{"layer": name, "unit": u, "energy": en_list[u],
                         "attribution": attr_list[u],
                         "kind": comp[1] if comp else "unit"} for u in picked]


def _plan_edges(r: _Reading) -> dict:
    """How each pair of layers is joined: weight (one conv / linear), path (composed through
    blocks), virtual (transformer components), else effective (gradient x activation)."""
    edges, plan = r.cfg.edges, {}
    for src, dst in r.pairs:
        how, w = edges, None
        if edges != "effective" and T.component_of(src) and T.component_of(dst):
            how = "virtual"
        elif edges in ("auto", "weight"):
            chain = r.chains.get((src, dst))
            got = P.path_weight(r.hm.model, chain, r.hm.n_units(src)) \
                if chain and P.verify(r.cache, src, chain, dst) else None
            if got is not None and got[0].shape[0] == r.hm.n_units(dst):
                how, w = ("weight", got[1]) if got[1] is not None else ("path", got[0])
            elif edges == "weight" and dst != "hook_pooled":
                raise CircuitlabError(f"the modules between {src} and {dst} do not compose "
                                      f"into a weight (a gate, attention or a branch that "
                                      f"skips a tap); use edges='effective'")
            else:
                how = "effective"
        plan[(src, dst)] = (how, w)
    return plan


def _class_links(r: _Reading) -> tuple[list, list]:
    """Pooled features -> the top classes: |W_fc[y, j]| * |h_j| for each class's strongest
    features, which become the pooled layer's chosen units. (edge rows, class node rows)"""
    head_rows, class_rows, features = [], [], []
    if r.fc is not None:
        h = r.cache["hook_pooled"][0].flatten()
        top = r.logits[0].topk(min(r.cfg.top_classes, r.logits.shape[-1])).indices.tolist()
        probs = r.logits[0].detach().softmax(-1)
        r.classes = [{"unit": y, "label": r.hm.label(y), "prob": float(probs[y])} for y in top]
        for y in top:
            contrib = r.fc.weight.detach()[y].abs() * h.abs()
            feats = contrib.topk(min(r.cfg.features_per_class, len(h))).indices.tolist()
            class_rows.append({"layer": "hook_logits", "unit": y,
                               "energy": float(r.logits[0, y]), "attribution": float("nan"),
                               "kind": "class"})
            for j in feats:
                if j not in features:
                    features.append(j)
                    r.node_rows.append({"layer": "hook_pooled", "unit": j,
                                        "energy": float(h[j]), "attribution": float("nan"),
                                        "kind": "feature"})
                head_rows.append({"src_layer": "hook_pooled", "src_unit": j,
                                  "dst_layer": "hook_logits", "dst_unit": y,
                                  "weight_l1": float(r.fc.weight[y, j].abs()),
                                  "src_energy": float(h[j].abs()),
                                  "score": float(contrib[j]), "kind": "feature_class"})
    r.chosen["hook_pooled"] = features
    r.energies["hook_pooled"] = r.cache["hook_pooled"][0].flatten().abs()
    if r.cfg.gradient:
        r.dscale["hook_pooled"] = r.cache.grad("hook_pooled")[0].flatten().abs()
    return head_rows, class_rows


def _edge_rows(r: _Reading, plan: dict) -> list:
    """One row per (chosen source, chosen destination) of every planned pair."""
    chosen, energies = r.chosen, r.energies
    # every effective edge from one batched forward and backward where the taps cut the
    # network in a chain
    eff_pairs = [(src, dst, chosen[dst]) for (src, dst), (how, _) in plan.items()
                 if how == "effective" and chosen[dst]]
    effective = effective_edges(r.hm, r.inp, eff_pairs) if eff_pairs else {}
    rows = []
    for (src, dst), (how, w) in plan.items():
        if not chosen[dst] or not chosen[src]:     # a layer that kept no unit has no edges
            continue
        s_idx = torch.as_tensor(chosen[src], dtype=torch.long)
        d_idx = torch.as_tensor(chosen[dst], dtype=torch.long)
        scale = r.dscale.get(dst) if r.cfg.gradient else None
        if how == "weight":
            wl, sc = E.scores(w, energies[src], chosen[src], chosen[dst], scale)
        elif how == "path":
            wl, sc = E.weight_scores(w, energies[src], chosen[src], chosen[dst], 1, scale)
        elif how == "virtual":
            wl = T.virtual_l1(r.hm.model, src, dst, chosen[src], chosen[dst]).to(
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
                rows.append({"src_layer": src, "src_unit": s, "dst_layer": dst,
                             "dst_unit": d, "weight_l1": wl[i][j], "src_energy": es[s],
                             "score": sc[i][j], "kind": how})
    return rows


def _edge_circuit(r: _Reading, reference) -> dict:
    """The smallest faithful edge circuit over every unit of the tapped layers
    (``edge_circuit``); its units are the ends of its edges."""
    s = prepare(r.hm, r.inp, r.layers, reference, r.target, r.cfg.ablation)
    every = {n: list(range(r.hm.n_units(n))) for n in r.layers}
    r.edge_search = smallest_edge_circuit(s, every, r.cfg.faithfulness, r.cfg.tolerance)
    units = {n: set() for n in r.layers}
    for src, i, dst, j, _ in r.edge_search.edges:
        units[src].add(i)
        units[dst].add(j)
    return {n: sorted(u) for n, u in units.items()}


def _edge_circuit_rows(r: _Reading) -> list:
    es = {n: r.energies[n].tolist() for n in r.layers}
    return [{"src_layer": src, "src_unit": i, "dst_layer": dst, "dst_unit": j,
             "weight_l1": float("nan"), "src_energy": es[src][i], "score": score,
             "kind": "attribution"} for src, i, dst, j, score in r.edge_search.edges]


def _meta(r: _Reading) -> dict:
    cfg = r.cfg
    meta = {"model": r.hm.name, "target": r.target, "label": r.hm.label(r.target),
            "read_on": "explanation" if r.on_explanation else "image",
            "select_by": cfg.select_by, "gradient": bool(cfg.gradient),
            "layers": ",".join(r.layers), "classes": r.classes}
    if cfg.select_by == "learned":
        meta.update(budget=float(cfg.budget), ablation=cfg.ablation)
    if r.search is not None:   # scalars, so graph exports carry them too
        meta.update(ablation=cfg.ablation, rank_by=cfg.rank_by,
                    **{f"search_{k}": v for k, v in r.search.summary().items()})
    if r.edge_search is not None:
        meta.update(ablation=cfg.ablation, **{f"edge_search_{k}": v
                                          for k, v in r.edge_search.summary().items()})
    return meta
