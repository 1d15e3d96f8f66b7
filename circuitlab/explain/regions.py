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
   of the best score seen is returned. Noise fills are drawn from the search's own stream
   (``backgrounds.fill_generator``), never the draws the metrics judge it with. The sets
   are scored a few per forward with the model in channels-last layout
   (``readers.channels_last``, undone afterwards): on a CPU that forward is 2x faster than
   32 at a time in the default layout.
2. Backward elimination: superpixels the decision holds without are removed, least useful
   first, until each remaining one is needed. A set still larger than ``refine_above`` is
   cut along a finer SLIC (``refine`` superpixels) and pruned again, a run of pieces at a
   time (found by bisection), until each piece is needed.
3. ``certify`` reports what each connected region does over the mean colour (at the same
   floor), without pruning; ``locally_minimal`` is the search's own certificate: the
   decision holds over every fill and no single superpixel (or piece) can be removed (not
   that no smaller set of superpixels, or of pixels, exists).

>>> ex = explain_regions(hm, x)                 # ex.mask: a few superpixel regions
>>> ex.search[0]                                # every round: area, worst-case p, held
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import pandas as pd
import torch
from skimage.segmentation import slic

from ..backgrounds import fill_generator, make_backgrounds
from ..data import denormalize
from ..errors import CircuitlabError
from ..execution import Execution
from ..hooked_model import HookedModel
from ..kernels import activation_matching
from ..metrics import target_classes
from ..readers import channels_last
from .certify import certify, masked_predictions
from .config import preset
from .objective import resolve_taps
from .optimize import Explanation


# How a set is scored at one fill. log p_target grows the sets a person reads (the cup's rim,
# the moped's tank), surer ones; the target's logit margin over the strongest other class is
# what top-1 needs, and finds sets where log p_target raised the target while another class
# rose faster (docs/results.md, "Superpixel regions").
SCORES = ("logp", "margin")


@dataclass(frozen=True)
class RegionSearch:
    """Settings of ``explain_regions``."""

    # SLIC superpixels asked for (it returns about as many); 128 over 64 on the photos:
    # smaller sets that hold more often (docs/results.md, "Superpixel regions")
    segments: int = 128
    compactness: float = 20.0        # SLIC: higher gives rounder, less colour-bound pieces
    fills: tuple = ("grey", "gaussian")   # the rest of the image, as backgrounds.KINDS
    # p_target under the first fill >= this x the image's; 0: the top-1 label under every
    # fill is the decision (1 holds on fewer photos, at larger areas: docs/results.md)
    confidence: float = 0.0
    top_k: int = 12                  # candidates beyond the set's neighbours: best alone
    # a set that holds but covers more than ``refine_above`` of the image is cut along a
    # finer SLIC of ``refine`` superpixels and pruned again (None: off); the photos it
    # took under 10 %: docs/results.md, "Superpixel regions"
    refine: Optional[int] = 256
    refine_above: float = 0.1
    # (how a set is scored at a fill (SCORES), the area at which that search stops growing),
    # tried in turn until a set holds; log p first, for its readable sets, but only to 15 %:
    # the sets it found past that were rare and slow (docs/results.md, "Superpixel regions")
    scores: tuple = (("logp", 0.15), ("margin", 0.3))
    act: float = 0.0                 # weight of activation matching (the paper's term, the
    #                                  family's taps, first fill) subtracted from the score
    # sets scored per forward; None: 4 on a CPU, where small batches in channels-last
    # layout ran fastest (docs/results.md, "Superpixel regions"), 64 on a GPU
    batch_size: Optional[int] = None
    channels_last: bool = True       # the model in channels-last layout during the search

    def __post_init__(self):
        if not 2 <= self.segments <= 1024:
            raise CircuitlabError(f"segments is how many superpixels, 2 to 1024; got "
                                  f"{self.segments}")
        if self.refine is not None and not 2 <= self.refine <= 1024:
            raise CircuitlabError(f"refine is how many superpixels the finer pass cuts the "
                                  f"image into, 2 to 1024, or None; got {self.refine}")
        if not 0 <= self.refine_above <= 1:
            raise CircuitlabError(f"refine_above is a fraction of the image, in [0, 1]; got "
                                  f"{self.refine_above}")
        if self.batch_size is not None and self.batch_size < 1:
            raise CircuitlabError(f"batch_size is how many sets a forward scores, at least 1; "
                                  f"got {self.batch_size}")
        if not self.fills:
            raise CircuitlabError("fills: at least one, e.g. ('grey', 'gaussian')")
        if not self.scores or not all(
                isinstance(st, (tuple, list)) and len(st) == 2 and st[0] in SCORES and
                isinstance(st[1], (int, float)) and 0 < st[1] <= 1 for st in self.scores):
            raise CircuitlabError(f"scores: one or more (score, largest area) pairs, the score "
                                  f"one of {', '.join(SCORES)} and the area in (0, 1], tried in "
                                  f"turn, e.g. (('logp', 0.15), ('margin', 0.3)); got "
                                  f"{self.scores!r}")


def superpixels(hm: HookedModel, x: torch.Tensor, search: RegionSearch) -> np.ndarray:
    """SLIC labels (H, W), 0..n-1, of one image (1, C, H, W) in the model's input space."""
    rgb = denormalize(x, hm)[0].permute(1, 2, 0).clamp(0, 1).cpu().numpy().astype(np.float64)
    channel_axis = -1 if rgb.shape[-1] == 3 else None
    img = rgb if channel_axis is not None else rgb[..., 0]
    return slic(img, n_segments=search.segments, compactness=search.compactness,
                start_label=0, channel_axis=channel_axis)


def _adjacent(labels: np.ndarray, n: int) -> list:
    """For each superpixel, the set of those it touches (4-neighbourhood)."""
    pairs = np.concatenate([np.stack([labels[:, :-1].ravel(), labels[:, 1:].ravel()], 1),
                            np.stack([labels[:-1].ravel(), labels[1:].ravel()], 1)])
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    out = [set() for _ in range(n)]
    for a, b in np.unique(pairs, axis=0):
        out[a].add(int(b))
        out[b].add(int(a))
    return out


class _Scorer:
    """The decision under each fill for sets of superpixels of one image."""

    def __init__(self, hm, x, labels, target, search: RegionSearch, seed: int, by: str):
        self.x, self.target, self.search, self.by = x, target, search, by
        n = int(labels.max()) + 1
        lab = torch.from_numpy(labels).to(x.device)
        self.pieces = torch.stack([(lab == i) for i in range(n)]).float()[:, None]
        self.fills = make_backgrounds(x, hm.data_config, search.fills,
                                      fill_generator(seed, "regions"))   # (F, C, H, W)
        names = []
        if search.act:
            points, self.alphas, self.kinds, self.cdims = resolve_taps(
                hm, preset("default", hm.family.name, min(x.shape[-2:])))
            names = [p.name for p in points]
        # the reader lays the inputs out as the weights are inside the search's block
        self.read = hm.reader(names, Execution(channels_last=search.channels_last))
        self.batch = search.batch_size or (4 if x.device.type == "cpu" else 64)
        if search.act:
            with torch.no_grad():
                self.acts_x = self.read(x)[1]

    def area(self, chosen) -> float:
        return float(self.mask(chosen).mean())

    def mask(self, chosen) -> torch.Tensor:
        idx = torch.tensor(sorted(chosen), dtype=torch.long, device=self.x.device)
        return self.pieces[idx].sum(0, keepdim=True).clamp(max=1) if len(idx) else \
            torch.zeros_like(self.pieces[:1])

    @torch.no_grad()
    def __call__(self, sets: list):
        """(log p_target per fill (S, F), top-1 kept per fill (S, F), the score (S,): the
        worst ``by`` (SCORES) over the fills less ``act`` x the activation distance) for each
        set."""
        logps, margins, dists = [], [], []
        for i in range(0, len(sets), self.batch):
            m = torch.cat([self.mask(s) for s in sets[i:i + self.batch]])
            outs = [self.read(m * self.x + (1 - m) * fill[None]) for fill in self.fills]
            per_fill = [logits for logits, _ in outs]
            if self.search.act:       # the taps' distance over the first fill
                acts = outs[0][1]
                dists.append(torch.stack([self._distance([a[j:j + 1] for a in acts])
                                          for j in range(m.shape[0])]))
            logps.append(torch.stack([f.log_softmax(-1)[:, self.target] for f in per_fill], 1))
            margins.append(torch.stack([self._margin(f) for f in per_fill], 1))
        logp, margin = torch.cat(logps).cpu(), torch.cat(margins).cpu()
        score = (logp if self.by == "logp" else margin).min(1).values
        if dists:
            score = score - self.search.act * torch.cat(dists).cpu()
        return logp, margin > 0, score

    def _margin(self, logits: torch.Tensor) -> torch.Tensor:
        other = logits.clone()
        other[:, self.target] = -float("inf")
        return logits[:, self.target] - other.max(-1).values

    def _distance(self, acts_e) -> torch.Tensor:
        return activation_matching(self.acts_x, acts_e, self.alphas, self.kinds, self.cdims)


def _grow(score: _Scorer, adjacent, floor: float, max_area: float, search: RegionSearch,
          trail):
    """Greedy insertion: (the set that holds, True), or, when none does within max_area,
    (the set of the best score seen, False)."""
    n = len(adjacent)
    _, _, alone = score([{i} for i in range(n)])
    prior = [int(i) for i in torch.argsort(-alone)]
    rank = {i: r for r, i in enumerate(prior)}
    chosen: set = set()
    fallback, fallback_score = set(), -float("inf")
    while True:
        near = set().union(*(adjacent[i] for i in chosen)) if chosen else set()
        cands = [i for i in prior if i not in chosen and (i in near or rank[i] < search.top_k)]
        cands = cands or [i for i in prior if i not in chosen]
        if not cands:
            return fallback, False
        logp, kept, value = score([chosen | {i} for i in cands])
        worst = logp.min(1).values
        best = int(torch.argmax(value))
        chosen = chosen | {cands[best]}
        holds = bool(kept[best].all()) and float(logp[best, 0].exp()) >= floor
        if float(value[best]) > fallback_score:
            fallback, fallback_score = set(chosen), float(value[best])
        trail.append({"step": "add", "area": score.area(chosen), "score": float(value[best]),
                      "worst_p": float(worst[best].exp()),
                      "p_first_fill": float(logp[best, 0].exp()), "holds": holds})
        if holds:
            return chosen, True
        if score.area(chosen) >= max_area:
            return fallback, False


def _prune(score: _Scorer, chosen: set, floor: float, trail, together: bool = False) -> set:
    """Backward elimination while the decision holds: each round scores every piece removed
    alone and removes the least needed one, or (``together``, for many small pieces) the
    longest run of removable ones, least needed first, that the decision holds without,
    found by bisection; until no single piece can go."""
    while len(chosen) > 1:
        order = sorted(chosen)
        logp, kept, value = score([chosen - {i} for i in order])
        ok = kept.all(1) & (logp[:, 0].exp() >= floor)
        if not ok.any():
            return chosen
        ranked = [j for j in torch.argsort(-value).tolist() if ok[j]]
        run = [order[j] for j in ranked]
        held = logp[ranked[0]]        # log p per fill of the set that goes on
        lo, hi = 1, len(run) if together else 1    # the first alone is known to hold
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lp, kp, _ = score([chosen - set(run[:mid])])
            if bool(kp.all()) and float(lp[0, 0].exp()) >= floor:
                lo, held = mid, lp[0]
            else:
                hi = mid - 1
        chosen = chosen - set(run[:lo])
        trail.append({"step": "refine" if together else "remove", "area": score.area(chosen),
                      "worst_p": float(held.min().exp()), "p_first_fill": float(held[0].exp()),
                      "holds": True})
    return chosen


def _finer(hm, x, search: RegionSearch, mask: torch.Tensor) -> np.ndarray:
    """Labels 0..k-1 of the pieces a finer SLIC of ``x`` cuts ``mask`` into, -1 outside."""
    fine = superpixels(hm, x, replace(search, segments=search.refine))
    inside = mask[0, 0].cpu().numpy() > 0
    out = np.full(fine.shape, -1)
    for k, i in enumerate(np.unique(fine[inside])):
        out[(fine == i) & inside] = k
    return out


def _one(hm, x, target: int, floor: float, search: RegionSearch, seed: int):
    """One image (1, C, H, W): (mask, the search's rounds, whether the decision held under
    every fill). Each (score, largest area) of ``search.scores`` is tried in turn until a set
    holds; if none does, the first search's set of the best score seen."""
    trail, first = [], None
    labels = superpixels(hm, x, search)          # every stage grows sets of the same pieces
    for by, max_area in search.scores:
        mask, rounds, held = _search(hm, x, labels, target, floor, search, seed, by,
                                     max_area)
        trail += [{**r, "scored_by": by} for r in rounds]
        first = mask if first is None else first
        if held:
            return mask, trail, True
    return first, trail, False


def _search(hm, x, labels: np.ndarray, target: int, floor: float, search: RegionSearch,
            seed: int, by: str, max_area: float):
    """Grow sets of the superpixels ``labels`` (to ``max_area`` at most), prune and refine
    on one image, sets scored ``by``: (mask, rounds, whether it held)."""
    score = _Scorer(hm, x, labels, target, search, seed, by)
    trail: list = []
    chosen, holds = _grow(score, _adjacent(labels, score.pieces.shape[0]), floor, max_area,
                          search, trail)
    if not holds:
        return score.mask(chosen), trail, False
    chosen = _prune(score, chosen, floor, trail)
    mask = score.mask(chosen)
    if search.refine and float(mask.mean()) > search.refine_above:
        fine = _Scorer(hm, x, _finer(hm, x, search, mask), target, search, seed, by)
        mask = fine.mask(_prune(fine, set(range(fine.pieces.shape[0])), floor, trail,
                                together=True))
    return mask, trail, True


def explain_regions(hm: HookedModel, x: torch.Tensor, search: RegionSearch = RegionSearch(),
                    *, target=None, seed: int = 0) -> Explanation:
    """A mask of a few compact superpixel regions per image of ``x`` (B, C, H, W) (module
    docstring). ``found`` says per image whether the decision held under every fill within
    a search's largest area (if not, the first search's set of the best score seen);
    ``search`` lists its rounds (``scored_by``: which search); ``certificates`` the
    connected regions' check at the confidence floor."""
    x = hm.check_input(x)
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = hm(x)
    targets = logits.argmax(-1) if target is None else target_classes(hm, x, target).to(x.device)
    p_image = logits.softmax(-1).gather(1, targets[:, None]).squeeze(1).cpu()
    with channels_last(hm.model) if search.channels_last else nullcontext():
        masks, trails, found = zip(*[
            _one(hm, x[i:i + 1], int(targets[i]), search.confidence * float(p_image[i]),
                 search, seed) for i in range(x.shape[0])])
    mask = torch.cat(masks)
    floors = torch.minimum(search.confidence * p_image, torch.cat([
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
                       search=list(trails))
