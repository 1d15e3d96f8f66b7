"""Every sufficient reason: disjoint explanations of one decision, each sufficient alone.

A model often has several independent reasons for one decision (the paper's two otters).
``all_reasons`` explains the image, deletes what that explanation kept (sets it to the
dataset mean), explains what is left for the same class, and so on: each reason is found on
the image without the earlier ones, so the reasons are disjoint. Each round:

1. The free explanation of what is left (``explain``); where it finds no label-keeping mask,
   again from other seeds (``tries`` in all), since a run from one draw can miss a mask
   another finds.
2. Its surest part that suffices alone: the mask's connected parts (pieces closer than
   ``GAP`` of the side joined) that keep the class as top-1 on their own, the surest of them.
   A first explanation often takes a little of each of two objects, and deleting it leaves
   neither whole for the next round; the part not taken stays in the image for a later
   round. Where no part suffices alone (a fragment on each object, needed together), the
   surest part's neighbourhood (``WINDOW`` of the side around it) is explained alone, the
   rest at the mean, and its mask taken where it suffices, else the neighbourhood itself
   where it suffices (the next step prunes it); else the whole mask.
3. ``minimal``: pruned region by region (``certify``) at the confidence that part has on
   what is left (or what is left has, where lower but above the blank image's), so a reason
   keeps as much of its object as its confidence needs instead of the fragment that keeps
   the label alone, which would leave the rest of the object for the next round to find
   again.
4. Accepted if it keeps the class as top-1 on its own (the rest of the image at the mean)
   and is surer of it than the blank image (the mean alone): where the blank image already
   gives the class, top-1 alone says nothing, and a reason must add evidence to it.

With ``search`` (a ``RegionSearch``; the command line's regions mode, the default on photos)
each round's explanation is the region search's on what is left (``explain_regions``: a few
compact superpixel regions, already pruned under its fills), and step 3 is left out.

The search stops after ``k`` reasons, or when a round finds none. How these steps were
chosen, and how often both planted objects of the benchmark's two-object variant are found:
docs/results.md, "Every sufficient reason".

>>> found = all_reasons(hm, x, k=3)[0]        # per image: its reasons, surest first
>>> [(r.area, r.confidence) for r in found]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from scipy import ndimage

from ..errors import CircuitlabError
from ..hooked_model import HookedModel
from ..metrics import STRUCTURE_8, target_classes
from .certify import certify, masked_predictions
from .config import ExplainConfig, RegionSearch
from .optimize import Explanation, explain
from .regions import explain_regions

# pieces of a mask closer than this fraction of the image's side are one part (1 px at 32 px,
# 7 px at 224); the neighbourhood explained where no part suffices (4 px at 32); runs of
# explain per round, from seeds seed + round + k * try
GAP = 1 / 32
WINDOW = 1 / 8
TRIES = 3


@dataclass
class Reason:
    """One sufficient reason: its mask (1, 1, H, W), found ``order``-th."""

    mask: torch.Tensor
    confidence: float          # p_target with only this reason shown
    area: float
    order: int                 # 1 = found first
    explanation: Explanation   # the run that found it (on the image minus earlier reasons)


def reasons_of_one(hm: HookedModel, x: torch.Tensor, k: int, target: int,
                   config: Optional[ExplainConfig], seed: int, minimal: bool,
                   first: Optional[Explanation] = None, tries: int = TRIES,
                   search: Optional[RegionSearch] = None) -> list:
    """``all_reasons`` for one image (1, C, H, W); ``first``: its free explanation (before any
    pruning; with ``search``, its region search's) when already run with this target and
    ``seed``, used as the first round's first run."""
    removed = torch.zeros_like(x[:, :1])
    blank = float(masked_predictions(hm, x, removed, target)[0][0])     # nothing shown
    found = []
    for i in range(k):
        rest = (1 - removed) * x
        seeds = [seed + i + k * t for t in range(tries if search is None else 1)]
        ex = _explained(hm, rest, config, search, target, seeds, first if i == 0 else None)
        if ex is None:
            break
        mask = _surest_part(hm, rest, ex.mask.to(x.device), target, blank,
                            lambda part: _run(hm, part, config, search, seed + i, target))
        if minimal and search is None:     # a region search's set is pruned by the search
            mask = certify(hm, rest, mask, torch.tensor([target]),
                           floor=torch.tensor([_floor(hm, rest, mask, target, blank)])
                           )[0].mask.to(x.device)
        mask = mask * (1 - removed)
        if mask.sum() == 0 or (1 - removed - mask).clamp_min(0).sum() == 0:  # nothing left
            break
        confidence, sufficient = _sufficient(hm, x, mask, target, blank)
        if not sufficient[0]:
            break
        found.append(Reason(mask.cpu(), float(confidence[0]), float(mask.mean()), i + 1, ex))
        removed = (removed + mask).clamp(max=1)
    return sorted(found, key=lambda r: -r.confidence)


def _run(hm, image, config, search: Optional[RegionSearch], seed: int,
         target: int) -> Explanation:
    """One explanation of ``image`` for ``target``: the pixel optimisation, or the region
    search where ``search`` is given."""
    if search is None:
        return explain(hm, image, config, seed=seed, target=target)
    return explain_regions(hm, image, search, target=target, seed=seed)


def _explained(hm, rest, config, search, target: int, seeds: list,
               first: Optional[Explanation]) -> Optional[Explanation]:
    """The first run over ``seeds`` (``first`` standing for the first seed's) whose mask
    keeps the label; None where none does."""
    for j, s in enumerate(seeds):
        ex = first if j == 0 and first is not None else \
            _run(hm, rest, config, search, s, target)
        if bool(ex.found[0]):
            return ex
    return None


def _surest_part(hm, rest: torch.Tensor, mask: torch.Tensor, target: int, blank: float,
                 explain_alone=None) -> torch.Tensor:
    """Of ``mask``'s parts (its 8-connected pieces, those closer than ``GAP`` of the side
    joined), the surest that keeps ``target`` as top-1 alone on ``rest`` and is surer than
    ``blank``. Where none does: the mask ``explain_alone`` (image -> Explanation) finds in
    the surest part's neighbourhood (``WINDOW`` of the side around it, the rest at the mean),
    where it suffices so, else that neighbourhood, where it does; else ``mask`` itself (also
    where it is one part)."""
    m = mask[0, 0].cpu().numpy() > 0.5
    gap = int(round(GAP * min(m.shape)))
    joined = ndimage.binary_dilation(m, iterations=gap) if gap else m
    labels, n = ndimage.label(joined, structure=STRUCTURE_8)
    if n < 2:
        return mask
    parts = torch.from_numpy(np.stack([(labels == j) & m for j in range(1, n + 1)]))
    parts = parts[:, None].to(mask)
    p, ok = _sufficient(hm, rest, parts, target, blank)
    if ok.any():
        best = int(torch.where(ok, p, torch.full_like(p, -1.0)).argmax())
        return parts[best:best + 1]
    if explain_alone is None:
        return mask
    near = ndimage.binary_dilation(parts[int(p.argmax()), 0].cpu().numpy() > 0,
                                   iterations=int(round(WINDOW * min(m.shape))))
    window = torch.from_numpy(near)[None, None].to(mask)
    ex = explain_alone(window * rest)
    # a run that found nothing returns no mask to trust (the pixel optimisation the whole
    # image, the region search its best set that did not hold): then the neighbourhood
    for local in (ex.mask.to(mask) * window, window) if bool(ex.found[0]) else (window,):
        if bool(_sufficient(hm, rest, local, target, blank)[1][0]):
            return local
    return mask


def _floor(hm, rest: torch.Tensor, mask: torch.Tensor, target: int, blank: float) -> float:
    """The confidence a reason is pruned at: what ``mask`` gives on ``rest``, or what ``rest``
    itself gives where lower and above the blank image's ``blank``: where the blank image
    gives the class, a floor at or below it lets the pruning delete everything. (Where the
    mask's own is not above ``blank`` either, the reason is refused after the pruning.)"""
    own = float(masked_predictions(hm, rest, mask, target)[0][0])
    with torch.no_grad():
        p_rest = float(hm(rest).softmax(-1)[0, target])
    return min(own, p_rest) if p_rest > blank else own


def _sufficient(hm, image: torch.Tensor, masks: torch.Tensor, target: int, blank: float):
    """(p_target under each of ``masks`` over ``image``, the rest at the mean; whether each
    suffices: keeps ``target`` as top-1 and is surer of it than the blank image, ``blank``)."""
    p, kept = masked_predictions(hm, image, masks, target)
    return p, kept & (p > blank)


def all_reasons(hm: HookedModel, x: torch.Tensor, k: int = 3,
                config: Optional[ExplainConfig] = None, *, target=None, seed: int = 0,
                minimal: bool = True, tries: int = TRIES,
                search: Optional[RegionSearch] = None) -> list:
    """Per image of ``x``, up to ``k`` disjoint reasons (``Reason``), each keeping ``target``
    (default the model's top-1) on its own and surer of it than the blank image, ordered by
    confidence (module docstring: how each round finds one). ``minimal``: each reason is
    pruned region by region (``certify``) at its own confidence before the next is sought;
    it is not searched down to a smaller area (``minimize``), which would leave most of an
    object behind for the next reason to find again. ``tries``: runs of ``explain`` from
    different seeds before a round gives up. ``search``: each round's explanation is the
    region search's (``explain_regions``: a few compact superpixel regions, pruned by the
    search under its fills, so ``minimal`` and ``tries`` do not apply; its only randomness
    is the noise fills' draw) instead of the pixel optimisation's (``config``)."""
    if not isinstance(k, int) or k < 1:
        raise CircuitlabError(f"k is the number of reasons to look for, at least 1; got {k!r}")
    if not isinstance(tries, int) or tries < 1:
        raise CircuitlabError(f"tries is how many runs a round may take, at least 1; got "
                              f"{tries!r}")
    x = hm.check_input(x)
    targets = target_classes(hm, x, target)
    return [reasons_of_one(hm, x[i:i + 1], k, int(targets[i]), config, seed, minimal,
                           tries=tries, search=search)
            for i in range(x.shape[0])]
