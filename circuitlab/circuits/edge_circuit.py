"""Edge circuits between consecutive taps: score every edge, keep the fewest that carry the
decision, and run the network with only those edges.

An edge (s, i) -> (d, j) joins unit i of tap s to unit j of the next tap d. Removing it
means: unit j of d is computed as if unit i of s held its ablated value (the reference mean
per position, or zero), while every other destination still sees i as it is. That is
exact, not linearised: the network from s to d runs once per destination unit, in one batch
of copies (copy k carries the source units that feed the k-th destination unit of the
circuit), and d is assembled from the copies, unit j from its own copy, before the next
pair does the same. It needs taps that cut the network (stage or block outputs): a skip
connection around a tap would carry the removed source past it.

Score of an edge (edge attribution patching, Syed et al. 2023, against the ablated value):
sum_pos |(a_i - mean_i) * d(sum_pos' g_j a_j) / d a_i| in the node circuit's network, g_j =
d z_y / d a_j: the linear estimate of the effect of removing that edge alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..errors import CircuitlabError
from ..hook_points import units_first
from .effective import _leaves
from .search import Setup, bracket


def _pairs(units: dict, layers: Sequence[str]) -> list[tuple]:
    return [(s, d) for s, d in zip(layers, layers[1:]) if units.get(s) and units.get(d)]


class _Copies:
    """The copy layout of an edge-ablated run: for each pair (s, d), copy k computes the
    k-th destination unit of d in the circuit, from the sources that feed it."""

    def __init__(self, s: Setup, units: dict, kept: dict):
        ab = s.ablated
        self.s, self.units = s, units
        pairs = _pairs(units, ab.layers)
        self.k = max([len(units[d]) for _, d in pairs] or [1])
        self.uniform = False    # every segment k copies (for models that fix the batch)
        self.keep = ab.keep_masks(units)
        # copy_of: destination -> the copy each of its units is read from (a layer with an
        # incoming pair); masks: source -> (copies, U_s) which sources feed each copy (a
        # layer with an outgoing pair)
        self.copy_of, self.masks = {}, {}
        for src, d in pairs:
            rows = torch.zeros(ab.sizes[d], dtype=torch.long)   # units outside: any copy
            rows[torch.as_tensor(units[d], dtype=torch.long)] = torch.arange(len(units[d]))
            self.copy_of[d] = rows
            col, sources = {j: c for c, j in enumerate(units[d])}, set(units[src])
            m = torch.zeros(len(units[d]), ab.sizes[src], dtype=torch.bool)
            for i, j in kept.get((src, d), ()):
                if j in col and i in sources:
                    m[col[j], i] = True
            self.masks[src] = m

    def _copies(self, name: str, act: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """The copies of ``name``'s output for its outgoing pair (k of them when uniform)."""
        m = self.masks[name].to(act.device)
        if self.uniform and len(m) < self.k:
            m = torch.cat([m, m[:1].expand(self.k - len(m), -1)])
        shape = [len(m)] + [1] * (act.dim() - 1)
        shape[self.s.ablated.axes[name]] = -1
        return torch.where(m.view(shape), act, base)

    def hooks(self, leaves: Optional[dict] = None, held: Optional[dict] = None) -> list:
        ab = self.s.ablated

        def make(name):
            def fn(act, _name):
                ax, base = ab.axes[name], ab.values[name].to(act.dtype)
                if name in self.copy_of:         # unit j of d from its own copy
                    a = act.movedim(ax, 1)
                    a = a[self.copy_of[name].to(a.device), torch.arange(a.shape[1])]
                    act = a.unsqueeze(0).movedim(1, ax)
                act = torch.where(self.keep[name].to(act.device).view(ab.shape(name, act)),
                                  act[:1], base)
                if held is not None:
                    held[name] = act
                if name not in self.masks:
                    return act.expand(self.k, *act.shape[1:]) if self.uniform else act
                if leaves is not None:           # one leaf per copy: gradients stay apart
                    n = self.k if self.uniform else len(self.masks[name])
                    leaves[name] = act.detach().expand(n, *act.shape[1:]).clone() \
                        .requires_grad_(True)
                    act = leaves[name]
                return self._copies(name, act, base)
            return fn
        return [(n, make(n)) for n in ab.layers]

    def run(self, x: torch.Tensor, **kw) -> torch.Tensor:
        """The logits of one image under the layout. The copies differ only from the first
        tap on, and each segment between taps runs as many copies as its destination has
        units, so the layers before the first tap run once; a model that fixed its batch
        size earlier in its forward runs k copies of x all the way instead."""
        hm = self.s.ablated.hm
        if not self.uniform:
            try:
                logits = hm.run_with_hooks(x, self.hooks(**kw))
                if logits.shape[0] == 1:
                    return logits
            except Exception:  # noqa: BLE001 -- any failure means: run the safe way
                pass
            self.uniform = True
            for d in kw.values():
                d.clear()
        return hm.run_with_hooks(x.expand(self.k, *x.shape[1:]), self.hooks(**kw))[:1]

    @torch.no_grad()
    def probe(self) -> tuple:
        """``Setup.probe`` of the edge circuit: the image and every reference."""
        return self.s.score(torch.cat([self.run(img[None]) for img in self.s.batch]))


def _check_cut(held: dict, leaves: dict, pairs: list) -> None:
    for src, d in pairs:
        if _leaves(held[d]) != {id(leaves[src])}:
            raise CircuitlabError(f"edge circuits need taps that cut the network: {d} is "
                                  f"reached from before {src} by a skip connection; tap stage "
                                  f"or block outputs (a ViT: --units channels)")


def everything(units: dict, layers: Sequence[str]) -> dict:
    """Every edge between the units of consecutive taps: {(src, dst): {(i, j)}}."""
    return {(s, d): {(i, j) for i in units[s] for j in units[d]} for s, d in
            _pairs(units, layers)}


def edge_attribution(s: Setup, units: dict) -> dict:
    """{(src, dst): (len(units[dst]), len(units[src]))} edge attribution scores of every edge
    between the circuit's units of consecutive taps (module docstring)."""
    ab = s.ablated
    pairs = _pairs(units, ab.layers)
    if not pairs:
        return {}
    held: dict = {}
    xg = s.x.detach().clone().requires_grad_(True)
    z = ab.hm.run_with_hooks(xg, ab.hooks(ab.keep_masks(units), held))[0, s.target]
    g = dict(zip(ab.layers, torch.autograd.grad(z, [held[n] for n in ab.layers])))
    layout = _Copies(s, units, everything(units, ab.layers))
    held, leaves = {}, {}
    layout.run(s.x, leaves=leaves, held=held)
    _check_cut(held, leaves, pairs)
    total = 0
    for _, d in pairs:         # sum_j g_j a_j; a_j of the assembled d came from j's copy
        js = torch.as_tensor(units[d])
        total = total + (units_first(held[d], ab.axes[d])[0, js] *
                         units_first(g[d], ab.axes[d])[0, js]).sum()
    grads = torch.autograd.grad(total, [leaves[src] for src, _ in pairs])
    out = {}
    for (src, d), gr in zip(pairs, grads):
        delta = units_first(leaves[src].detach()[:1] - ab.values[src], ab.axes[src])  # (1,U,P)
        sc = (units_first(gr, ab.axes[src])[:len(units[d])] * delta).abs().sum(-1)
        out[(src, d)] = sc[:, torch.as_tensor(units[src])].cpu()
    return out


def edge_order(scores: dict, units: dict) -> list[tuple]:
    """All scored edges (src, i, dst, j, score), highest first."""
    rows = []
    for (src, d), sc in scores.items():
        for a, j in enumerate(units[d]):
            for b, i in enumerate(units[src]):
                rows.append((src, i, d, j, float(sc[a, b])))
    return sorted(rows, key=lambda r: -r[4])


def kept_edges(edges: Sequence[tuple]) -> dict:
    """{(src, dst): {(i, j)}} of a list of (src, i, dst, j, ...) edges."""
    out: dict = {}
    for e in edges:
        out.setdefault((e[0], e[2]), set()).add((e[1], e[3]))
    return out


def edge_probe(s: Setup, units: dict, edges: Sequence[tuple]) -> tuple:
    """``Setup.probe`` of the circuit of ``units`` with only ``edges`` between its taps."""
    return _Copies(s, units, kept_edges(edges)).probe()


@dataclass
class EdgeSearch:
    """The fewest top-scored edges of a node circuit that keep the contrast."""

    edges: list                 # (src, i, dst, j, score) kept, highest score first
    n_edges: int
    total: int                  # every edge between the node circuit's consecutive taps
    threshold: float
    contrast: float
    logit_fraction: float
    prob_fraction: float
    top1_kept: bool
    found: bool
    probes: list = field(default_factory=list)
    random_contrast: float = float("nan")    # random edge circuits of the same size, mean

    @property
    def fraction(self) -> float:
        return self.n_edges / max(1, self.total)

    def summary(self) -> dict:
        return {"threshold": self.threshold, "edges": self.n_edges, "total": self.total,
                "fraction": self.fraction, "contrast": self.contrast,
                "logit_fraction": self.logit_fraction, "prob_fraction": self.prob_fraction,
                "top1_kept": self.top1_kept, "found": self.found, "probes": len(self.probes),
                "random_contrast": self.random_contrast}


def smallest_edge_circuit(s: Setup, units: dict, faithfulness: float = 0.8,
                          tolerance: float = 0.01, n_random: int = 2,
                          seed: int = 0) -> EdgeSearch:
    """The fewest edges of the node circuit ``units`` (top of the edge scores) that keep
    ``faithfulness`` of the contrast with top-1 kept, and ``n_random`` random edge circuits
    of that size for comparison. Each probe runs the image and every reference once."""
    order = edge_order(edge_attribution(s, units), units)
    total = len(order)
    if not total:
        raise CircuitlabError("the circuit has fewer than two tapped layers with units: no "
                              "edges between taps to select")
    full = s.probe(s.ablated.keep_masks(units))      # every edge: the node circuit itself
    n, probes, ok = bracket(lambda m: edge_probe(s, units, order[:m]), total, faithfulness,
                            tolerance, full)
    g = torch.Generator().manual_seed(seed)
    rand = [edge_probe(s, units, [order[i] for i in torch.randperm(total, generator=g)[:n]])[0]
            for _ in range(n_random)]
    return EdgeSearch(order[:n], n, total, faithfulness, *probes[n], ok,
                      [(m, c, t) for m, (c, _, _, t) in sorted(probes.items())],
                      sum(rand) / len(rand) if rand else float("nan"))
