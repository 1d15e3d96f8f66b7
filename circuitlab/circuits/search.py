"""The smallest circuit that carries the decision: the default readout.

Both phases run the network with every tapped unit outside the circuit replaced by its mean
over reference images (per position; ``zero`` replaces it by 0):

1. Rank (``ranking.rank_units``): all tapped units of all layers in one order, by default
   attribution patching against the reference mean recomputed in the ablated network
   (``iterative``, about 1 / prune forward+backward passes of one image); ``rank_by``
   picks another ranking (plain attribution, EAP-IG, energy, random).
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

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..deprecations import renamed
from ..errors import CircuitlabError
from ..hooked_model import HookedModel
from .learned import CONTRAST_IMAGES, learn_units
from .basis import FeatureAblated
from .ranking import Ablated, forward_backward, rank_units


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


@dataclass
class Setup:
    """One image's readout problem: its ablated network, the image and the references in one
    batch (every probe runs them together), the target and the clean contrast."""

    ablated: Ablated
    batch: torch.Tensor
    target: int
    clean: torch.Tensor         # the clean network's logits on the image
    contrast0: float

    @property
    def x(self) -> torch.Tensor:
        return self.batch[:1]

    @torch.no_grad()
    def probe(self, keep: dict) -> tuple:
        """(contrast kept, logit fraction, probability fraction, top-1 kept) of the circuit
        with keep masks ``keep``."""
        return self.score(self.ablated.hm.run_with_hooks(self.batch, self.ablated.hooks(keep)))

    def score(self, logits: torch.Tensor) -> tuple:
        """The same from the logits of the batch (image first) under some intervention."""
        y = self.target
        z = logits[:, y]
        return (float(z[0] - z[1:].mean()) / self.contrast0, float(z[0] / self.clean[y]),
                float(logits[0].softmax(-1)[y] / self.clean.softmax(-1)[y]),
                bool(logits[0].argmax() == y))

    def probe_top(self, order: Sequence[tuple], n: int) -> tuple:
        return self.probe(self.ablated.keep_masks(self.ablated.top(order, n)))


@renamed(method="ablation")
def prepare(hm: HookedModel, x: torch.Tensor, layers: Sequence[str], reference: torch.Tensor,
            target: Optional[int] = None, ablation: str = "mean",
            basis: Optional[dict] = None) -> Setup:
    """Check the inputs and set up the ablated network and the contrast of one image.
    ``basis`` ({layer: SparseDictionary}) makes the units dictionary features and error
    nodes (``basis.FeatureAblated``) instead of the layers' own units."""
    x = hm.check_input(x)
    if x.shape[0] != 1:
        raise CircuitlabError("the faithful readout reads one image at a time")
    if reference is None or len(reference) == 0:
        raise CircuitlabError("the faithful readout needs reference images (the mean "
                              "ablation and the contrast): pass reference=<batch (R, C, H, "
                              "W)>, or select_by='energy' for the paper's descriptive readout")
    reference = hm.check_input(reference.to(x.device))
    ablated = Ablated(hm, layers, reference, ablation) if basis is None else \
        FeatureAblated(hm, layers, reference, ablation, basis)
    with torch.no_grad():
        clean = hm(x)[0]
    y = int(clean.argmax()) if target is None else int(target)
    contrast0 = float(clean[y] - ablated.ref_logits[:, y].mean())
    if contrast0 <= 0:
        raise CircuitlabError("the reference images score the target class as high as the "
                              "image itself; pass references of other classes")
    return Setup(ablated, torch.cat([x, reference]), y, clean, contrast0)


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


def bracket(evaluate, total: int, threshold: float, tolerance: float,
            full: tuple) -> tuple[int, dict, bool]:
    """The smallest n in 1..total for which ``evaluate(n)`` (a probe tuple, as
    ``Setup.probe``) keeps ``threshold`` of the contrast with top-1 kept, to within
    ``tolerance`` of ``total``; ``full`` is the probe of all ``total`` (not run again).
    Returns (n, {n: probe}, whether ``full`` passes); assumes the contrast grows with n."""
    probes = {total: full}

    def passes(n):
        if n not in probes:
            probes[n] = evaluate(n)
        c, _, _, top1 = probes[n]
        return c >= threshold and top1

    lo, hi = 0, total
    ok = passes(total)
    step = max(1, int(tolerance * total))
    c_lo, last = 0.0, None      # nothing kept: no contrast
    while ok and hi - lo > step:
        mid = _next_probe(lo, hi, c_lo, probes[hi][0], threshold, step, last)
        if passes(mid):
            hi, last = mid, "hi"
        else:
            lo, c_lo, last = mid, probes[mid][0], ("lo" if last != "lo" else "lo twice")
    return hi, probes, ok


@renamed(method="ablation")
def smallest_faithful(hm: HookedModel, x: torch.Tensor, layers: Sequence[str],
                      reference: torch.Tensor, *, target: Optional[int] = None,
                      faithfulness: float = 0.8, ablation: str = "mean", prune: float = 0.1,
                      tolerance: float = 0.01, refine_steps: int = 0, shrink: float = 0.9,
                      rank_by: str = "iterative", ig_steps: int = 8) -> SizeSearch:
    """The fewest top-ranked units of ``layers`` whose circuit keeps ``faithfulness`` of the
    contrast with top-1 kept, every other unit of ``layers`` ablated (module docstring).

    ``reference`` images give the mean ablation and the contrast, all of them, as
    ``validate.faithfulness`` uses them: the contrast found here is the one it reports."""
    s = prepare(hm, x, layers, reference, target, ablation)
    ablated = s.ablated
    order = rank_units(ablated, s.x, s.target, rank_by, prune=prune, steps=ig_steps)
    total = len(order)
    # keeping every unit is the clean network: contrast 1, no need to run it
    full = (1.0, 1.0, 1.0, bool(s.clean.argmax() == s.target))
    hi, probes, ok = bracket(lambda n: s.probe_top(order, n), total, faithfulness, tolerance,
                             full)
    result = SizeSearch(ablated.top(order, hi), hi, total, faithfulness, *probes[hi], ok,
                        [(n, c, t) for n, (c, _, _, t) in sorted(probes.items())],
                        {"forward_backward": forward_backward(rank_by, total, prune, ig_steps),
                         "forward": len(s.batch) + (len(probes) - 1) * len(s.batch)})
    if refine_steps and ok:
        result = _refine(s, result, refine_steps, shrink, ablation)
    return result


def _refine(s: Setup, found: SizeSearch, steps: int, shrink: float,
            ablation: str) -> SizeSearch:
    """Step 3 of the module docstring: the smallest learned circuit that passed."""
    ablated, batch, y = s.ablated, s.batch, s.target
    x, reference = batch[:1], batch[1:]
    best, n = found, found.n_units
    while True:
        n = min(n - 1, int(n * shrink))
        if n < 1:
            break
        units = learn_units(ablated.hm, x, ablated.layers, n / found.total, target=y,
                            ablation=ablation, reference=reference, steps=steps, init=best.units)
        probe = s.probe(ablated.keep_masks(units))
        best.probes.append((n, probe[0], probe[3]))
        best.passes["forward_backward"] += steps * (1 + min(CONTRAST_IMAGES, len(reference)))
        best.passes["forward"] += len(batch)
        if not (probe[0] >= best.threshold and probe[3]):
            break
        best = SizeSearch(units, n, found.total, found.threshold, *probe, True, best.probes,
                          best.passes)
    return best
