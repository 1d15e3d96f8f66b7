"""The region search's settings (``RegionSearch``; the search is ``regions``), the pieces it
builds a mask from and how a set of them is scored: SLIC superpixels of the image, which
touch which, and the decision under each fill (the rest of the image at the dataset mean,
Gaussian noise, ...) for a set of them, a few sets per forward; a set scored once is not
scored again.

>>> labels = superpixels(hm, x, RegionSearch())
>>> score = Scorer(hm, x, labels, target, RegionSearch(), seed=0, by="logp")
>>> logp, kept, value = score([{0, 3}, {5}])     # per set: log p and top-1 per fill, score
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import torch
from skimage.segmentation import slic

from ..backgrounds import fill_generator, make_backgrounds
from ..data import denormalize
from ..errors import CircuitlabError
from ..execution import Execution
from ..hooked_model import HookedModel
from ..kernels import activation_matching
from .config import preset
from .objective import resolve_taps


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
    # a set that holds is grown on around its regions by its worst log p, to this area at
    # most, until p_target under the first fill is the image's, then pruned at that floor
    # (the finer pass may cut it again); where it does not get there the set that holds is
    # kept. 0.15 over 0.1: the image's confidence on four photos of eight, not three
    # (docs/results.md, "Superpixel regions"); None: off
    confident_within: Optional[float] = 0.15
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
        if self.confident_within is not None and not 0 < self.confident_within <= 1:
            raise CircuitlabError(f"confident_within is a fraction of the image, in (0, 1], "
                                  f"or None; got {self.confident_within}")
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


def adjacent(labels: np.ndarray, n: int) -> list:
    """For each superpixel, the set of those it touches (4-neighbourhood)."""
    pairs = np.concatenate([np.stack([labels[:, :-1].ravel(), labels[:, 1:].ravel()], 1),
                            np.stack([labels[:-1].ravel(), labels[1:].ravel()], 1)])
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    out = [set() for _ in range(n)]
    for a, b in np.unique(pairs, axis=0):
        out[a].add(int(b))
        out[b].add(int(a))
    return out


class Scorer:
    """The decision under each fill for sets of superpixels of one image."""

    def __init__(self, hm, x, labels, target, search: RegionSearch, seed: int, by: str):
        self.x, self.target, self.search, self.by = x, target, search, by
        # per set of pieces: (log p per fill, margin per fill, activation distance); shared
        # with the scorers ``scoring`` makes
        self.memo: dict = {}
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

    def scoring(self, by: str) -> "Scorer":
        """This scorer with the sets scored ``by`` (SCORES): the same pieces, fills, reader
        and kept scores, so a set scored by either is not scored again."""
        other = copy.copy(self)
        other.by = by
        return other

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
        set; a set scored before is not scored again."""
        keys = [frozenset(s) for s in sets]
        todo = [k for k in dict.fromkeys(keys) if k not in self.memo]
        for i in range(0, len(todo), self.batch):
            self._score(todo[i:i + self.batch])
        logp, margin, dist = (torch.stack([self.memo[k][j] for k in keys]) for j in range(3))
        score = (logp if self.by == "logp" else margin).min(1).values
        return logp, margin > 0, score - self.search.act * dist

    def _score(self, sets: list) -> None:
        m = torch.cat([self.mask(s) for s in sets])
        outs = [self.read(m * self.x + (1 - m) * fill[None]) for fill in self.fills]
        logp = torch.stack([logits.log_softmax(-1)[:, self.target] for logits, _ in outs], 1)
        margin = torch.stack([self._margin(logits) for logits, _ in outs], 1)
        dist = torch.zeros(len(sets))
        if self.search.act:       # the taps' distance over the first fill
            acts = outs[0][1]
            dist = torch.stack([self._distance([a[j:j + 1] for a in acts]).reshape(())
                                for j in range(len(sets))])
        for j, s in enumerate(sets):
            self.memo[s] = (logp[j].cpu(), margin[j].cpu(), dist[j].cpu())

    def _margin(self, logits: torch.Tensor) -> torch.Tensor:
        other = logits.clone()
        other[:, self.target] = -float("inf")
        return logits[:, self.target] - other.max(-1).values

    def _distance(self, acts_e) -> torch.Tensor:
        return activation_matching(self.acts_x, acts_e, self.alphas, self.kinds, self.cdims)


def finer(hm, x, search: RegionSearch, mask: torch.Tensor) -> np.ndarray:
    """Labels 0..k-1 of the pieces a finer SLIC of ``x`` cuts ``mask`` into, -1 outside."""
    fine = superpixels(hm, x, replace(search, segments=search.refine))
    inside = mask[0, 0].cpu().numpy() > 0
    out = np.full(fine.shape, -1)
    for k, i in enumerate(np.unique(fine[inside])):
        out[(fine == i) & inside] = k
    return out
