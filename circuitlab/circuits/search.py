"""The smallest circuit that carries the decision: the default readout.

Both phases run the network with every tapped unit outside the circuit replaced by its mean
over reference images (per position; ``zero`` replaces it by 0):

1. Rank (``rank_units``): all tapped units of all layers in one order, by attribution
   patching against the reference mean, recomputed in the ablated network. Each round runs
   the current circuit on the image with gradients, scores every kept unit u by
   sum_pos |(a_u - mean_u) * d z_y / d a_u| and drops the ``prune`` fraction of all units
   that score lowest; the units dropped last rank first. About 1 / prune forward+backward
   passes of one image. The signed sum (the linear estimate of ablating u) cancels across
   positions and prunes the narrow early layers first, which leaves circuits that keep the
   image's logit without reading the image (README: circuits).
2. Size (``smallest_faithful``): a bracketing search over n on the nested circuits "the top
   n of the ranking" (the next probe interpolated where the contrast should cross the
   threshold, the midpoint when that stalls) for the fewest units that keep ``faithfulness``
   of the image-vs-reference contrast, (z_y(x) - mean z_y(refs)) under the circuit over the
   same for the clean network, with the top-1 class kept. Each probe is one forward of the
   image and the contrast references together; the search stops once the bracket is within
   ``tolerance`` of all units. The search assumes the contrast grows with n along the
   ranking: the size returned passed, and the largest probed size below it (at most
   ``tolerance`` of the units fewer) failed.
3. Refine (optional, ``refine_steps`` > 0): learned gates (``circuits.learned``) started
   from that circuit, at budgets shrinking by ``shrink`` from its size while the learned
   circuit still passes the same test; each budget costs ``refine_steps`` forward+backward
   passes of the image and 8 references.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..errors import CircuitlabError
from ..hooked_model import HookedModel
from .learned import CONTRAST_IMAGES, learn_units


class _Ablated:
    """Runs of ``hm`` in which every unit of ``layers`` outside a keep mask takes its
    ablated value: the mean over ``reference`` (per position) or zero."""

    def __init__(self, hm: HookedModel, layers: Sequence[str], reference: torch.Tensor,
                 method: str):
        if method not in ("mean", "zero"):
            raise CircuitlabError("the faithful readout ablates with 'mean' or 'zero'")
        self.hm, self.layers = hm, list(layers)
        self.axes = {n: hm.point(n).unit_axis for n in self.layers}
        self.sizes = {n: hm.n_units(n) for n in self.layers}
        with torch.no_grad():
            self.ref_logits, rc = hm.run_with_cache(reference, names=self.layers)
        self.values = {n: rc[n].mean(0, keepdim=True) if method == "mean"
                       else torch.zeros_like(rc[n][:1]) for n in self.layers}

    def hooks(self, keep: dict, held: Optional[dict] = None) -> list:
        def make(name):
            def fn(act, _name):
                shape = [1] * act.dim()
                shape[self.axes[name]] = -1
                m = keep[name].to(act.device).view(shape)
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


def rank_units(ablated: _Ablated, x: torch.Tensor, target: int,
               prune: float = 0.1) -> list[tuple]:
    """Every (layer, unit) of the tapped layers, most important first (module docstring)."""
    total = sum(ablated.sizes.values())
    drop = max(1, math.ceil(prune * total))
    keep = {n: torch.ones(s, dtype=torch.bool) for n, s in ablated.sizes.items()}
    removed: list[tuple] = []
    while len(removed) < total:
        held: dict = {}
        xg = x.detach().clone().requires_grad_(True)   # so every activation tracks gradients
        z = ablated.hm.run_with_hooks(xg, ablated.hooks(keep, held))[0, target]
        grads = torch.autograd.grad(z, [held[n] for n in ablated.layers])
        scores, units = [], []
        for name, g in zip(ablated.layers, grads):
            # |.| per position before the sum: a channel whose deviation from the mean pushes
            # the logit up here and down there is not unimportant (the signed sum cancels,
            # and then the narrow early layers, which carry the image, go first)
            s = ((held[name] - ablated.values[name]) * g).detach().abs()
            s = s.movedim(ablated.axes[name], 1).flatten(2).sum((0, 2))          # (U,)
            live = torch.nonzero(keep[name]).flatten()
            scores.append(s[live].cpu())
            units += [(name, int(u)) for u in live]
        for i in torch.cat(scores).argsort()[:drop].tolist():
            layer, unit = units[i]
            keep[layer][unit] = False
            removed.append((layer, unit))
    return removed[::-1]


@dataclass
class SizeSearch:
    """What the size search found and what it cost."""

    units: dict                 # {layer: [units]} of the smallest passing circuit
    n_units: int
    total: int                  # all tapped units
    threshold: float
    contrast: float             # kept image-vs-reference contrast of that circuit
    logit_fraction: float       # its target logit over the clean network's
    prob_fraction: float
    top1_kept: bool
    found: bool                 # False only when even the whole network fails the test
    probes: list = field(default_factory=list)    # (units, contrast, top1_kept) each probe
    passes: dict = field(default_factory=dict)    # model runs, in images

    @property
    def fraction(self) -> float:
        return self.n_units / self.total

    def summary(self) -> dict:
        return {"threshold": self.threshold, "units": self.n_units, "total": self.total,
                "fraction": self.fraction, "contrast": self.contrast,
                "logit_fraction": self.logit_fraction, "prob_fraction": self.prob_fraction,
                "top1_kept": self.top1_kept, "found": self.found, "probes": len(self.probes),
                **{f"passes_{k}": v for k, v in self.passes.items()}}


@torch.no_grad()
def _probe(ablated: _Ablated, batch: torch.Tensor, keep: dict, target: int,
           clean_x: torch.Tensor, contrast0: float) -> tuple:
    logits = ablated.hm.run_with_hooks(batch, ablated.hooks(keep))
    z = logits[:, target]
    contrast = float(z[0] - z[1:].mean()) / contrast0
    return (contrast, float(z[0] / clean_x[target]),
            float(logits[0].softmax(-1)[target] / clean_x.softmax(-1)[target]),
            bool(logits[0].argmax() == target))


def _next_probe(lo: int, hi: int, c_lo: float, c_hi: float, target: float, step: int,
                last) -> int:
    """Where the contrast should cross ``target`` between the bracket's ends, by linear
    interpolation (it grows smoothly with the size), kept a step inside the bracket; the
    midpoint when the interpolation stalls (the same end moved twice running)."""
    mid = (lo + hi) // 2
    if last == "lo twice" or c_hi <= c_lo:
        return mid
    guess = lo + (target - c_lo) / (c_hi - c_lo) * (hi - lo)
    return int(min(max(round(guess), lo + step), hi - step)) if hi - lo > 2 * step else mid


def smallest_faithful(hm: HookedModel, x: torch.Tensor, layers: Sequence[str],
                      reference: torch.Tensor, *, target: Optional[int] = None,
                      faithfulness: float = 0.8, method: str = "mean", prune: float = 0.1,
                      tolerance: float = 0.01, refine_steps: int = 0,
                      shrink: float = 0.9) -> SizeSearch:
    """The fewest top-ranked units of ``layers`` whose circuit keeps ``faithfulness`` of the
    contrast with top-1 kept, every other unit of ``layers`` ablated (module docstring).

    ``reference`` images give the mean ablation and the contrast, all of them, as
    ``validate.faithfulness`` uses them: the contrast found here is the one it reports."""
    x = hm.check_input(x)
    if x.shape[0] != 1:
        raise CircuitlabError("the faithful readout reads one image at a time")
    if reference is None or len(reference) == 0:
        raise CircuitlabError("the faithful readout needs reference images (the mean "
                              "ablation and the contrast): pass reference=<batch (R, C, H, "
                              "W)>, or select_by='energy' for the paper's descriptive readout")
    reference = hm.check_input(reference.to(x.device))
    ablated = _Ablated(hm, layers, reference, method)
    with torch.no_grad():
        clean_x = hm(x)[0]
    y = int(clean_x.argmax()) if target is None else int(target)
    contrast0 = float(clean_x[y] - ablated.ref_logits[:, y].mean())
    if contrast0 <= 0:
        raise CircuitlabError("the reference images score the target class as high as the "
                              "image itself; pass references of other classes")
    order = rank_units(ablated, x, y, prune)
    total = len(order)
    batch = torch.cat([x, reference])
    probes: dict = {}

    def passes(n):
        if n not in probes:
            probes[n] = _probe(ablated, batch, ablated.keep_masks(ablated.top(order, n)), y,
                               clean_x, contrast0)
        c, _, _, top1 = probes[n]
        return c >= faithfulness and top1

    # keeping every unit is the clean network: contrast 1, no need to run it
    probes[total] = (1.0, 1.0, 1.0, bool(clean_x.argmax() == y))
    lo, hi = 0, total
    ok = passes(total)          # False only when the target is not the top-1 class
    step = max(1, int(tolerance * total))
    c_lo, last = 0.0, None      # no unit kept: no contrast
    while ok and hi - lo > step:
        mid = _next_probe(lo, hi, c_lo, probes[hi][0], faithfulness, step, last)
        if passes(mid):
            hi, last = mid, "hi"
        else:
            lo, c_lo, last = mid, probes[mid][0], ("lo" if last != "lo" else "lo twice")
    rounds = math.ceil(total / max(1, math.ceil(prune * total)))
    result = SizeSearch(ablated.top(order, hi), hi, total, faithfulness, *probes[hi], ok,
                        [(n, c, t) for n, (c, _, _, t) in sorted(probes.items())],
                        {"forward_backward": rounds, "forward": len(reference) + 1 +
                         (len(probes) - 1) * len(batch)})    # the whole network's probe is free
    if refine_steps and ok:
        result = _refine(ablated, batch, y, clean_x, contrast0, result, refine_steps, shrink,
                         method)
    return result


def _refine(ablated: _Ablated, batch, y, clean_x, contrast0, found: SizeSearch, steps: int,
            shrink: float, method: str) -> SizeSearch:
    """Step 3 of the module docstring: the smallest learned circuit that passed. ``batch`` is
    the image and the references, as the probes run them."""
    x, reference = batch[:1], batch[1:]
    best, n = found, found.n_units
    while True:
        n = min(n - 1, int(n * shrink))
        if n < 1:
            break
        units = learn_units(ablated.hm, x, ablated.layers, n / found.total, target=y,
                            method=method, reference=reference, steps=steps, init=best.units)
        probe = _probe(ablated, batch, ablated.keep_masks(units), y, clean_x, contrast0)
        best.probes.append((n, probe[0], probe[3]))
        best.passes["forward_backward"] += steps * (1 + min(CONTRAST_IMAGES, len(reference)))
        best.passes["forward"] += len(batch)
        if not (probe[0] >= best.threshold and probe[3]):
            break
        best = SizeSearch(units, n, found.total, found.threshold, *probe, True, best.probes,
                          best.passes)
    return best
