"""One global order of all tapped units, most important first: what circuits are cut from.

Every ranking scores a unit u of a tapped layer against its ablated value (the mean over the
reference images per position, or zero) and orders all units of all layers together, so a
circuit of n units is the top n, wherever they lie:

- ``iterative`` (the default of the faithful readout): attribution patching recomputed in the
  ablated network. Each round runs the current circuit on the image with gradients, scores
  every kept unit by sum_pos |(a_u - mean_u) * d z_y / d a_u| and drops the ``prune``
  fraction of all units that score lowest; the units dropped last rank first. About
  1 / prune forward+backward passes of one image.
- ``attribution``: the first round of that alone (attribution patching, Nanda 2023; one
  forward+backward).
- ``eap-ig``: integrated gradients along the path from the ablated network to the clean one
  (EAP-IG, Hanna et al. 2024, with the interpolation in activation space): every tapped
  layer outputs mean + alpha (a - mean), the gradient is averaged over ``steps`` values of
  alpha (midpoints, one batch), and u scores sum_pos |(a_u - mean_u) * mean_alpha g_u|.
- ``energy``: ||a_u|| over positions, the paper's score (descriptive), and ``random``; both
  rank within each layer and interleave the layers by rank / layer size, so every cut takes
  the same fraction of each layer (energies of different layers are not comparable).

|.| per position before the sum: a unit whose deviation from the mean pushes the logit up
here and down there is not unimportant; the signed sum cancels, prunes the narrow early
layers first and leaves circuits that keep the image's logit without reading the image.
"""
from __future__ import annotations

import copy
import math
from typing import Optional, Sequence

import torch

from ..errors import CircuitlabError
from ..hooked_model import HookedModel
from ..hook_points import units_first

RANKINGS = ("iterative", "attribution", "eap-ig", "energy", "random")


class Ablated:
    """Runs of ``hm`` in which every unit of ``layers`` outside a keep mask takes its
    ablated value: the mean over ``reference`` (per position) or zero."""

    rankings = RANKINGS         # what can rank its units

    def __init__(self, hm: HookedModel, layers: Sequence[str], reference: torch.Tensor,
                 ablation: str):
        if ablation not in ("mean", "zero"):
            raise CircuitlabError("the faithful readout ablates with 'mean' or 'zero'")
        self.hm, self.layers = hm, list(layers)
        self.axes = {n: hm.point(n).unit_axis for n in self.layers}
        self.sizes = {n: hm.n_units(n) for n in self.layers}
        with torch.no_grad():
            self.ref_logits, rc = hm.run_with_cache(reference, names=self.layers)
        self.values = {n: rc[n].mean(0, keepdim=True) if ablation == "mean"
                       else torch.zeros_like(rc[n][:1]) for n in self.layers}

    def resampled(self, images: torch.Tensor) -> list["Ablated"]:
        """One copy of this ablation per image, each unit ablated to that image's value
        (resample ablation, one draw per image)."""
        with torch.no_grad():
            _, rc = self.hm.run_with_cache(images, names=self.layers)
        return [self.ablated_to({n: rc[n][k:k + 1] for n in self.layers})
                for k in range(len(images))]

    def ablated_to(self, acts: dict) -> "Ablated":
        """A copy of this ablation whose ablated values are ``acts`` ({layer: (1, ...)
        activation}): every unit takes its value there."""
        a = copy.copy(self)
        a.values = dict(acts)
        return a

    def zeroed(self) -> "Ablated":
        """A copy of this ablation that ablates to zero (the same network and references)."""
        return self.ablated_to({n: torch.zeros_like(v) for n, v in self.values.items()})

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    def shape(self, name: str, act: torch.Tensor) -> list:
        """The broadcast shape of a per-unit vector of ``name`` against ``act``."""
        shape = [1] * act.dim()
        shape[self.axes[name]] = -1
        return shape

    def hooks(self, keep: dict, held: Optional[dict] = None) -> list:
        def make(name):
            def fn(act, _name):
                m = keep[name].to(act.device).view(self.shape(name, act))
                out = torch.where(m, act, self.values[name].to(act.dtype))
                if held is not None:
                    held[name] = out
                return out
            return fn
        return [(n, make(n)) for n in self.layers]

    def keep_masks(self, units: dict) -> dict:
        """Keep masks of a circuit {layer: [units]}."""
        keep = {name: torch.zeros(size, dtype=torch.bool) for name, size in self.sizes.items()}
        for layer, us in units.items():
            keep[layer][torch.as_tensor(list(us), dtype=torch.long)] = True
        return keep

    def top(self, order: Sequence[tuple], n: int) -> dict:
        """The circuit {layer: [units]} of the top ``n`` of a global ``order``."""
        units = {name: [] for name in self.layers}
        for layer, unit in order[:n]:
            units[layer].append(unit)
        return units

    def unit_scores(self, acts: dict, grads: dict) -> dict:
        """{layer: (U,)} sum_pos |(a - ablated) * g| of every unit."""
        return {n: units_first(((acts[n] - self.values[n]) * grads[n]).detach().abs(),
                            self.axes[n]).sum((0, 2)) for n in self.layers}


def _order(scores: dict, live: Optional[dict] = None) -> list[tuple]:
    """(layer, unit) pairs of ``scores`` ({layer: (U,)}), highest first (among ``live``)."""
    flat, units = [], []
    for name, s in scores.items():
        idx = torch.arange(len(s)) if live is None else torch.nonzero(live[name]).flatten()
        flat.append(s.cpu()[idx])
        units += [(name, int(u)) for u in idx]
    return [units[i] for i in torch.cat(flat).argsort(descending=True, stable=True).tolist()]


def _interleaved(scores: dict) -> list[tuple]:
    """Each layer ranked by its own scores, the layers merged by rank / layer size."""
    keyed = []
    for name, s in scores.items():
        for r, u in enumerate(s.cpu().argsort(descending=True, stable=True).tolist()):
            keyed.append(((r + 0.5) / len(s), name, u))
    return [(name, u) for _, name, u in sorted(keyed, key=lambda t: t[0])]


def _iterative(ablated: Ablated, x: torch.Tensor, target: int, prune: float) -> list[tuple]:
    total = ablated.total
    drop = max(1, math.ceil(prune * total))
    keep = {n: torch.ones(s, dtype=torch.bool) for n, s in ablated.sizes.items()}
    removed: list[tuple] = []
    while len(removed) < total:
        held: dict = {}
        xg = x.detach().clone().requires_grad_(True)   # so every activation tracks gradients
        z = ablated.hm.run_with_hooks(xg, ablated.hooks(keep, held))[0, target]
        grads = dict(zip(ablated.layers, torch.autograd.grad(
            z, [held[n] for n in ablated.layers])))
        order = _order(ablated.unit_scores(held, grads), keep)
        for layer, unit in order[::-1][:drop]:
            keep[layer][unit] = False
            removed.append((layer, unit))
    return removed[::-1]


def _eap_ig(ablated: Ablated, x: torch.Tensor, target: int, steps: int) -> list[tuple]:
    hm = ablated.hm
    with torch.no_grad():
        _, clean = hm.run_with_cache(x, names=ablated.layers)
    alpha = (torch.arange(steps, dtype=x.dtype, device=x.device) + 0.5) / steps
    held: dict = {}

    def make(name):
        def fn(act, _name):
            a = alpha.view([-1] + [1] * (act.dim() - 1)).to(act.dtype)
            base = ablated.values[name].to(act.dtype)
            held[name] = base + a * (act - base)
            return held[name]
        return fn
    xg = x.detach().expand(steps, *x.shape[1:]).clone().requires_grad_(True)
    z = hm.run_with_hooks(xg, [(n, make(n)) for n in ablated.layers])[:, target].sum()
    grads = torch.autograd.grad(z, [held[n] for n in ablated.layers])
    mean_g = {n: g.mean(0, keepdim=True) for n, g in zip(ablated.layers, grads)}
    return _order(ablated.unit_scores({n: clean[n] for n in ablated.layers}, mean_g))


def rank_units(ablated: Ablated, x: torch.Tensor, target: int, by: str = "iterative", *,
               prune: float = 0.1, steps: int = 8, seed: int = 0) -> list[tuple]:
    """Every (layer, unit) of the tapped layers, most important first (module docstring).
    ``prune``: iterative; ``steps``: eap-ig; ``seed``: random."""
    if by in RANKINGS and by not in ablated.rankings:
        raise CircuitlabError(f"{by} cannot rank these units; use one of "
                              f"{', '.join(ablated.rankings)}")
    if by == "iterative":
        return _iterative(ablated, x, target, prune)
    if by == "attribution":
        return _iterative(ablated, x, target, 1.0)
    if by == "eap-ig":
        if steps < 1:
            raise CircuitlabError("eap-ig needs at least one interpolation step")
        return _eap_ig(ablated, x, target, steps)
    if by == "energy":
        with torch.no_grad():
            _, cache = ablated.hm.run_with_cache(x, names=ablated.layers)
        return _interleaved({n: units_first(cache[n], ablated.axes[n])[0].norm(dim=-1)
                             for n in ablated.layers})
    if by == "random":
        g = torch.Generator().manual_seed(seed)
        return _interleaved({n: torch.rand(s, generator=g) for n, s in ablated.sizes.items()})
    raise CircuitlabError(f"rank_by must be one of {', '.join(map(repr, RANKINGS))}, "
                          f"got {by!r}")


def forward_backward(by: str, total: int, prune: float = 0.1, steps: int = 8) -> int:
    """What a ranking costs, in forward+backward passes of one image."""
    return {"iterative": math.ceil(total / max(1, math.ceil(prune * total))),
            "attribution": 1, "eap-ig": steps}.get(by, 0)
