"""Explanations made of a few compact regions: superpixels chosen greedily.

The pixel-mask optimisation (``explain``) finds masks the model reads surely, but on photos
they are speckle: tens of regions of a few pixels, held only while the rest is the mean colour
(docs/results.md, "Compact masks on photos"). This search builds the explanation out of SLIC
superpixels of the image (compact, colour-coherent pieces, ``segments`` of them) instead:

1. Greedy insertion. Each round scores every candidate superpixel added to the current set
   by the decision's worst case over the fills (log p_target with the rest at the dataset
   mean, over Gaussian noise, ...; one batched forward per fill) and adds the best. The
   candidates are the superpixels touching the set and the ``top_k`` best alone, so the set
   grows into a few connected regions. It stops when the top-1 label holds under every fill
   and p_target under the first fill is at least ``confidence`` x the image's (by default
   0: the label alone), or at the stage's largest area (15 %). Then the whole search is run
   again with the sets scored by the target's logit margin over the strongest other class,
   up to 30 % (``scores``), and if that fails too (``found`` False) the first search's set
   of the best score seen is returned. A set is scored once per image (the stages share
   the scores of the sets they both try, the superpixels alone first), and a round's best
   set is found without scoring every set under every fill: a set's score under one fill
   bounds its worst over them, so the other fills are scored only for the sets that could
   still win (``Scorer.best``; the same choice). Noise fills are
   drawn from the search's own stream (``backgrounds.fill_generator``), never the draws
   the metrics judge it with. The sets are scored a few per forward with the model in
   channels-last layout (``readers.channels_last``, undone afterwards): on a CPU that
   forward is 2x faster than 32 at a time in the default layout; by a copy of the model
   with its BatchNorms folded into the convolutions (``RegionSearch.fold_batchnorm``); on a
   CPU through that copy's ahead-of-time compiled package (``RegionSearch.compiled``,
   ``aot``: compiled once per model, input size and CPU, then loaded from the cache) on
   every thread, or, where it is off or cannot compile, several eager forwards at once,
   one thread each (``RegionSearch.workers``).
2. Backward elimination: superpixels the decision holds without are removed, least useful
   first, until each remaining one is needed. A removal may split a region, so elimination
   goes on only to sets with at least ``region_share`` of their pixels in their
   ``region_top`` largest connected regions (or the share the set had, where less).
3. Raised to the image's confidence: where p_target under the first fill is below the
   image's, the set grows on around its regions (by its worst log p) to at most
   ``confident_within`` of the image; where it gets there, it is pruned again with the
   image's p_target as the floor, else the set of step 2 stays. A set still larger than
   ``refine_above`` is then cut along a finer SLIC (``refine`` superpixels) and pruned
   again, a run of pieces at a time (found by bisection), until each piece is needed; with
   more than one ``refine`` (by default 256, then 512), again along each next SLIC while it
   is still larger, a later cut sweeping down each round's ranking (after the run it
   removes, the next run past the piece that ended it, to the ranking's end) instead of
   ranking again after each run.
4. ``certify`` reports what each connected region does over the mean colour (at the floor
   the set held at), without pruning; ``locally_minimal`` is the search's own certificate:
   the decision (top-1 under every fill, and p_target under the first at least the floor)
   holds and no single superpixel (or piece) can be removed without losing it or taking
   the mask below that region share (not that no smaller set of superpixels, or of pixels,
   exists).
5. Robust (``robust_draws`` > 0, off by default): a set held over one noise draw loses the
   label under most fresh ones. The set found (the mask so far as one piece) grows on by
   whole superpixels around it, by its worst logit margin, until top-1 holds by
   ``robust_margin`` under the first fill and ``robust_draws`` fresh draws of each noise
   fill (``backgrounds`` stream ``robust``), to at most ``robust_within`` of the image, and
   is pruned under them (rounds ``robust``, ``robust-remove``); where it does not get
   there the mask stays; where it gets there, ``locally_minimal`` speaks of the robust
   decision and its pieces.

>>> ex = explain_regions(hm, x)                 # ex.mask: a few superpixel regions
>>> ex.search[0]                                # every round: area, worst-case p, held
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import replace

import pandas as pd
import torch

from ..hooked_model import HookedModel
from ..metrics import regions, target_classes
from ..readers import channels_last
from .certify import certify, masked_predictions
from .config import RegionSearch, preset
from .optimize import Explanation
from .pieces import Scorer, adjacent, finer, holding, search_readers, superpixels

__all__ = ["RegionSearch", "explain_regions", "superpixels"]


def _grow(score: Scorer, touching: list, floor: float, max_area: float, search: RegionSearch,
          trail, start: frozenset = frozenset(), step: str = "add"):
    """Greedy insertion from ``start``: (the set that holds, True), or, when none does
    within max_area, (the set of the best score seen, False)."""
    n = len(touching)
    if search.top_k:          # the best alone are candidates: every piece scored alone
        _, _, alone = score([{i} for i in range(n)])
        prior = [int(i) for i in torch.argsort(-alone)]
    else:                     # neighbours only: no piece alone needs a forward
        prior = list(range(n))
    rank = {i: r for r, i in enumerate(prior)}
    chosen = set(start)
    fallback, fallback_score = set(chosen), -float("inf")
    while True:
        near = set().union(*(touching[i] for i in chosen)) if chosen else set()
        cands = [i for i in prior if i not in chosen and (i in near or rank[i] < search.top_k)]
        cands = cands or [i for i in prior if i not in chosen]
        if not cands:
            return fallback, False
        best, logp, kept, value = score.best([chosen | {i} for i in cands])
        chosen = chosen | {cands[best]}
        area = score.area(chosen)
        holds = bool(holding(logp[None], kept[None], floor)[0])
        if value > fallback_score:
            fallback, fallback_score = set(chosen), value
        trail.append(_round(score, step, area, logp, value=value, holds=holds))
        if holds:
            return chosen, True
        if area >= max_area:
            return fallback, False


def _prune(score: Scorer, chosen: set, floor: float, trail, step: str = "remove") -> set:
    """Backward elimination while the decision holds: each round removes the piece whose
    removal the decision holds best without (of those that keep the regions,
    ``_readable``), until no single piece can go."""
    while len(chosen) > 1:
        _, order = _removable(score, chosen)
        found = score.best([chosen - {i} for i in order], floor) if order else None
        if found is None:
            break
        chosen = chosen - {order[found[0]]}
        trail.append(_round(score, step, score.area(chosen), found[1]))
    return chosen


def _cut(score: Scorer, chosen: set, floor: float, trail, sweep: bool = False) -> set:
    """Backward elimination for many small pieces: each round ranks the pieces the decision
    holds without, least needed first, and removes the longest run of them it holds
    without (found by bisection); with ``sweep`` it goes on down the same ranking, past the
    piece that ended the run, removing the longest run from there, to the ranking's end
    (one ranking a round for a later, finer pass's many pieces). Until no single piece can
    go; every set it goes on to keeps the regions (``_readable``)."""
    while len(chosen) > 1:
        readable, order = _removable(score, chosen)
        ranked, logp = score.rank([chosen - {i} for i in order], floor) if order else ([], 0)
        if not ranked:
            break
        run, at, held = [order[j] for j in ranked], 0, logp[0]
        while at < len(run):
            # the first of the ranking is known to hold alone; past it, nothing is
            n, held = _longest_run(score, chosen, run[at:], floor, readable, held, at == 0)
            if n:
                chosen = chosen - set(run[at:at + n])
                trail.append(_round(score, "refine", score.area(chosen), held))
            if not sweep:
                break
            if n:                     # the share the rest of the sweep keeps: the new set's
                readable = _readable(score, chosen)
            at += n + 1
    return chosen


def _longest_run(score: Scorer, chosen: set, run: list, floor: float, readable, held,
                 first_holds: bool) -> tuple:
    """(how many of ``run``'s first pieces the decision holds without, by bisection; the
    log p per fill of ``chosen`` without them, ``held`` where none)."""
    lo, hi = int(first_holds), len(run)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        rest = chosen - set(run[:mid])
        # the regions first: a set that splits them needs no forward
        holds, lp = score.rank([rest], floor) if readable(rest) else ([], None)
        if holds:
            lo, held = mid, lp[0]
        else:
            hi = mid - 1
    return lo, held


def _removable(score: Scorer, chosen: set) -> tuple:
    """(``_readable`` from ``chosen``, the pieces of ``chosen`` whose removal alone keeps
    the regions, in order)."""
    readable = _readable(score, chosen)
    return readable, [i for i in sorted(chosen) if readable(chosen - {i})]


def _readable(score: Scorer, chosen: set):
    """Which sets elimination may go on to from ``chosen``: those that keep at least
    ``region_share`` of their pixels in their ``region_top`` largest connected regions (or
    the share ``chosen`` has, where less). A removal inside a region can split it in two."""
    top, need = score.search.region_top, score.search.region_share
    if not need:
        return lambda s: True
    share = lambda s: float(regions(score.mask(s), top)["top_regions_share"][0])  # noqa: E731
    floor = min(need, share(chosen))
    return lambda s: share(s) >= floor


def _round(score: Scorer, step: str, area: float, logp: torch.Tensor, value=None,
           holds=True) -> dict:
    """One round of the trail: the set's area, score ``value`` and log p ``logp`` per fill,
    and the images the image's search has scored so far (its forwards' cost)."""
    return {"step": step, "area": area, **({} if value is None else {"score": value}),
            "worst_p": float(logp.min().exp()), "p_first_fill": float(logp[0].exp()),
            "holds": holds, "images": score.spent[0]}


def _one(hm, x, target: int, p_image: float, search: RegionSearch, seed: int, reads: list):
    """One image (1, C, H, W): (mask, the search's rounds, whether the decision held under
    every fill, the floor on p_target it held at). Each (score, largest area) of
    ``search.scores`` is tried in turn until a set holds; if none does, the first search's
    set of the best score seen."""
    trail, first = [], None
    # every stage grows sets of the same pieces, scored under the same fills, each set once
    labels = superpixels(hm, x, search)
    pieces = Scorer(hm, x, labels, target, search, seed, search.scores[0][0], reads)
    touching = adjacent(labels, pieces.count)
    for by, max_area in search.scores:
        mask, rounds, held, floor = _search(hm, x, pieces.scoring(by), touching, p_image,
                                            search, max_area)
        trail += [{**r, "scored_by": by} for r in rounds]
        first = (mask, floor) if first is None else first
        if held:
            break
    else:
        mask, floor = first
    # the last round's count includes the forwards that found nothing more to remove
    if trail:
        trail[-1]["images"] = pieces.spent[0]
    return mask, trail, held, floor


def _search(hm, x, score: Scorer, touching: list, p_image: float, search: RegionSearch,
            max_area: float):
    """Grow sets of the scorer's pieces (to ``max_area`` at most), prune, raise to the
    image's confidence and refine on one image: (mask, rounds, whether it held, the floor
    on p_target it held at)."""
    floor, trail = search.confidence * p_image, []
    chosen, holds = _grow(score, touching, floor, max_area, search, trail)
    if not holds:
        return score.mask(chosen), trail, False, floor
    chosen = _prune(score, chosen, floor, trail)
    if search.confident_within and float(score([chosen])[0][0, 0].exp()) < p_image:
        more, sure = _grow(score.scoring("logp"), touching, p_image, search.confident_within,
                           replace(search, top_k=0), trail,
                           start=frozenset(chosen), step="raise")
        if sure:
            chosen, floor = _prune(score, more, p_image, trail), p_image
    mask = score.mask(chosen)
    for k, segments in enumerate(search.refine_passes):
        if float(mask.mean()) <= search.refine_above:
            break
        fine = score.over(finer(hm, x, search, segments, mask))
        mask = fine.mask(_cut(fine, set(range(fine.count)), floor, trail, sweep=k > 0))
    if search.robust_draws:
        mask = _robust(score, mask, floor, search, trail)
    return mask, trail, True, floor


def _robust(score: Scorer, mask: torch.Tensor, floor: float, search: RegionSearch,
            trail) -> torch.Tensor:
    """The mask grown on by whole superpixels around it (the mask itself one more piece, 0)
    until top-1 holds by ``robust_margin`` under the robust fills, then pruned under them;
    the mask as it was where that takes more than ``robust_within`` of the image."""
    rob, labels = score.around(mask)
    rob = rob.under(search.robust_fills, search.robust_margin).scoring("margin")
    grown, held = _grow(rob, adjacent(labels, rob.count), floor, search.robust_within,
                        replace(search, top_k=0), trail, start=frozenset({0}), step="robust")
    return rob.mask(_prune(rob, grown, floor, trail, "robust-remove")) if held else mask


def explain_regions(hm: HookedModel, x: torch.Tensor, search: RegionSearch = RegionSearch(),
                    *, target=None, seed: int = 0) -> Explanation:
    """A mask of a few compact superpixel regions per image of ``x`` (B, C, H, W) (module
    docstring). ``found`` says per image whether the decision held under every fill within
    a search's largest area (if not, the first search's set of the best score seen);
    ``search`` lists its rounds (``scored_by``: which search); ``certificates`` the
    connected regions' check at the floor each held at."""
    x = hm.check_input(x)
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = hm(x)
    targets = logits.argmax(-1) if target is None else target_classes(hm, x, target).to(x.device)
    p_image = logits.softmax(-1).gather(1, targets[:, None]).squeeze(1).cpu()
    with channels_last(hm.model) if search.channels_last else nullcontext():
        reads = search_readers(hm, search, x)          # the images' scorers share them
        masks, trails, found, used = zip(*[
            _one(hm, x[i:i + 1], int(targets[i]), float(p_image[i]), search, seed, reads)
            for i in range(x.shape[0])])
    mask = torch.cat(masks)
    floors = torch.minimum(torch.tensor(used, dtype=p_image.dtype), torch.cat([
        masked_predictions(hm, x[i:i + 1], mask[i:i + 1], int(targets[i]))[0]
        for i in range(x.shape[0])]))
    # reported, not pruned (max_rounds=0): the certificate deletes regions over the mean
    # colour only, and pruning by it would undo what the other fills need
    certificates = certify(hm, x, mask, targets, max_rounds=0, floor=floors)
    # locally minimal as the search certifies it: the decision holds over every fill and
    # no single superpixel can go (what backward elimination leaves)
    certificates = [replace(c, locally_minimal=bool(f)) for c, f in zip(certificates, found)]
    cfg = preset("default", hm.family.name, min(x.shape[-2:]))
    return Explanation(mask=mask, soft=mask.float().cpu(), explanation=mask * x,
                       target=targets, steps=max(len(t) for t in trails),
                       history=pd.DataFrame([{"image": i, **r} for i, t in enumerate(trails)
                                             for r in t]),
                       seconds=time.perf_counter() - t0, config=cfg,
                       found=torch.tensor(found), certificates=certificates,
                       search=list(trails),
                       scoring="compiled" if reads[0].ahead else "eager")
