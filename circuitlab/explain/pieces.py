"""The pieces the region search (``regions``; its settings ``config.RegionSearch``) builds a
mask from and how a set of them is scored: SLIC superpixels of the image, which
touch which, and the decision under each fill (the rest of the image at the dataset mean,
Gaussian noise, ...) for a set of them, a few sets per forward; a set scored once is not
scored again, and the best set of a round is found scoring most sets under one fill only
(``Scorer.best``).

>>> labels = superpixels(hm, x, RegionSearch())
>>> score = Scorer(hm, x, labels, target, RegionSearch(), seed=0, by="logp")
>>> logp, kept, value = score([{0, 3}, {5}])     # per set: log p and top-1 per fill, score
>>> i, logp_i, kept_i, value_i = score.best([{0, 3}, {5}])   # the argmax of value, cheaper
"""
from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Optional

import numpy as np
import torch
from skimage.segmentation import slic

from ..backgrounds import fill_generator, make_backgrounds
from ..data import denormalize
from ..execution import Execution
from ..hooked_model import HookedModel
from ..kernels import activation_matching
from .config import SCORES, RegionSearch, preset
from .objective import resolve_taps


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


def search_readers(hm: HookedModel, search: RegionSearch, x: torch.Tensor) -> list:
    """The readers a search over images like ``x`` scores sets with, one per worker, each on
    its own copy of the model (a reader arms hooks and switches attention kernels on its
    model, so threads share none); made once per ``explain_regions`` call and handed to
    each image's scorer. Inside the search's channels-last block the reader lays the
    inputs out as the weights are. A reader compiled ahead of time runs on every thread, one
    forward at a time, unless ``search.workers`` says otherwise."""
    names = [p.name for p in _taps(hm, x)[0]] if search.act else []
    ahead = search.compiled and not names and x.device.type == "cpu" and \
        x.dtype == torch.float32
    read = hm.reader(names, Execution(compile="aot" if ahead else None,
                                      channels_last=search.channels_last,
                                      fold_batchnorm=search.fold_batchnorm), like=x)
    workers = search.workers or (1 if read.ahead or x.device.type != "cpu"
                                 else min(torch.get_num_threads(), 8))
    return [read] + [read.replica() for _ in range(workers - 1)]


def _taps(hm: HookedModel, x: torch.Tensor):
    """The activation term's taps, weights, distances and channel dims (the family's)."""
    return resolve_taps(hm, preset("default", hm.family.name, min(x.shape[-2:])))


class Scorer:
    """The decision under each fill for sets of superpixels of one image."""

    def __init__(self, hm, x, labels, target, search: RegionSearch, seed: int, by: str,
                 reads: Optional[list] = None):
        self.x, self.target, self.search, self.by = x, target, search, by
        self.config, self.seed = hm.data_config, seed
        self.need = 0.0                  # the logit margin by which top-1 holds
        self.spent = [0]                 # images scored, shared by the scorers it makes
        # per (set of pieces, fill): (log p, margin); per set: the activation distance;
        # per score: the fill scored first by ``best``; shared with the scorers ``scoring``
        # makes
        self.memo, self.dists, self.leads = {}, {}, {}
        self.labels, self.count = _labels(labels, x.device)
        self.fills = self._draw(search.fills, "regions")      # (F, C, H, W)
        self.batch = search.batch_size or (4 if x.device.type == "cpu" else 64)
        self.reads = list(reads or search_readers(hm, search, x))
        if search.act:
            _, self.alphas, self.kinds, self.cdims = _taps(hm, x)
            with torch.no_grad():
                self.acts_x = self.reads[0](x)[1]

    def scoring(self, by: str) -> "Scorer":
        """This scorer with the sets scored ``by`` (SCORES): the same pieces, fills, readers
        and kept scores, so a set scored by either is not scored again."""
        other = copy.copy(self)
        other.by = by
        return other

    def over(self, labels: np.ndarray) -> "Scorer":
        """This scorer over other pieces (labels 0..k-1, -1 for none): the same fills, readers
        and score, its own kept scores."""
        other = copy.copy(self)
        other.labels, other.count = _labels(labels, self.x.device)
        other.memo, other.dists = {}, {}
        return other

    def around(self, mask: torch.Tensor):
        """(this scorer over the mask (1, 1, H, W) as one piece, 0, and the parts of its
        pieces outside it, 1..k; those labels, for ``adjacent``): for a scorer whose pieces
        cover the image."""
        labels = np.where(mask[0, 0].cpu().numpy() > 0, 0, self.labels.cpu().numpy())
        return self.over(labels), labels

    def under(self, kinds: tuple, need: float) -> "Scorer":
        """This scorer with the fills ``kinds`` drawn from the robust stream, top-1 held only
        by a logit margin of at least ``need``: the same pieces and readers, its own kept
        scores."""
        other = copy.copy(self)
        other.fills = self._draw(kinds, "robust")
        other.memo, other.dists, other.leads, other.need = {}, {}, {}, need
        return other

    def _draw(self, kinds: tuple, stream: str) -> torch.Tensor:
        """The fills ``kinds`` of this image, random ones drawn from ``stream`` (its own
        draws, never the metrics')."""
        return make_backgrounds(self.x, self.config, kinds, fill_generator(self.seed, stream))

    def area(self, chosen) -> float:
        return float(self.mask(chosen).mean())

    def mask(self, chosen) -> torch.Tensor:
        keep = torch.zeros(self.count + 1, device=self.x.device)
        keep[torch.tensor(sorted(chosen), dtype=torch.long, device=self.x.device) + 1] = 1
        return keep[self.labels][None, None]

    @torch.no_grad()
    def __call__(self, sets: list):
        """(log p_target per fill (S, F), top-1 kept per fill (S, F), the score (S,): the
        worst ``by`` (SCORES) over the fills less ``act`` x the activation distance) for each
        set; a set scored before is not scored again."""
        keys = [frozenset(s) for s in sets]
        for j in range(len(self.fills)):
            self._fill(keys, j)
        logp, margin = (torch.stack([torch.stack([self.memo[k, j][i] for j in
                                                  range(len(self.fills))]) for k in keys])
                        for i in range(2))
        score = (logp if self.by == "logp" else margin).min(1).values
        dist = torch.stack([self.dists[k] for k in keys]) if self.search.act else 0
        return logp, margin > self.need, score - self.search.act * dist

    @torch.no_grad()
    def best(self, sets: list, floor: Optional[float] = None):
        """(index, log p per fill, top-1 kept per fill, score) of the set of ``sets`` with the
        highest score (the first of a tie), of those that hold at ``floor`` (``holding``)
        when one is given; None where none does. The same set as the scores ``__call__``
        gives, for fewer forwards: a set's score under one fill bounds its worst over the
        fills, so the lead fill (the one whose scores were lowest so far) is scored for every
        set, the others, best bound first, only until no bound left can beat the best found.
        """
        keys = [frozenset(s) for s in sets]
        idx, bound = self._bounds(keys, floor)
        order = sorted(idx, key=lambda i: -bound[i])
        # the best bound alone first (its score is usually its bound, and then no other
        # set needs a forward), then a batch for each worker at a time
        top, step = None, self.batch * len(self.reads)
        for start, end in _chunks(len(order), step):
            chunk = [i for i in order[start:end] if top is None or bound[i] >= top[3]]
            if not chunk:
                break
            logp, kept, value = self([keys[i] for i in chunk])
            ok = holding(logp, kept, floor) if floor is not None else torch.ones(len(chunk))
            for j, i in enumerate(chunk):
                v = float(value[j])
                if ok[j] and (top is None or v > top[3] or (v == top[3] and i < top[0])):
                    top = (i, logp[j], kept[j], v)
        return top

    @torch.no_grad()
    def rank(self, sets: list, floor: float):
        """(indices of the sets of ``sets`` that hold at ``floor``, highest score first (the
        first of a tie first), their log p per fill), as the scores ``__call__`` gives; a set
        that loses top-1 under the lead fill is scored under it alone."""
        keys = [frozenset(s) for s in sets]
        idx, _ = self._bounds(keys, floor)
        if not idx:
            return [], None
        logp, kept, value = self([keys[i] for i in idx])
        ok = holding(logp, kept, floor)
        pos = sorted((j for j in range(len(idx)) if ok[j]), key=lambda j: -float(value[j]))
        return [idx[j] for j in pos], logp[pos]

    def _bounds(self, keys: list, floor: Optional[float]):
        """(indices of the sets of ``keys`` worth scoring under every fill, an upper bound of
        each one's score): where bounds pay (no activation term, more than one fill), the
        lead fill scored for every set, its score the bound, and with a floor the sets that
        lose top-1 under it left out (they cannot hold)."""
        if self.search.act or len(self.fills) == 1:
            return list(range(len(keys))), [float("inf")] * len(keys)
        lead = self._lead()
        self._fill(keys, lead)
        scored = [self.memo[k, lead] for k in keys]
        bound = [float(sc[SCORES.index(self.by)]) for sc in scored]
        return [i for i in range(len(keys))
                if floor is None or float(scored[i][1]) > self.need], bound

    def _lead(self) -> int:
        """The fill whose ``by`` scores were lowest on average over the sets scored under
        every fill so far (the last fill before any is)."""
        if self.by not in self.leads:
            at = SCORES.index(self.by)
            full = [k for k in {k for k, _ in self.memo}
                    if all((k, j) in self.memo for j in range(len(self.fills)))]
            if not full:
                return len(self.fills) - 1
            means = [sum(float(self.memo[k, j][at]) for k in full) / len(full)
                     for j in range(len(self.fills))]
            self.leads[self.by] = int(np.argmin(means))
        return self.leads[self.by]

    def _fill(self, keys: list, j: int) -> None:
        """Score under fill ``j`` the sets of ``keys`` not scored under it yet."""
        todo = [k for k in dict.fromkeys(keys) if (k, j) not in self.memo]
        chunks = [todo[i:i + self.batch] for i in range(0, len(todo), self.batch)]
        n = min(len(chunks), len(self.reads))
        if n > 1:     # worker w scores chunks w, w + n, ... with its own reader, one thread
            def work(w):
                return [self._forward(c, j, self.reads[w]) for c in chunks[w::n]]

            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                with ThreadPoolExecutor(n) as pool:
                    parts = list(pool.map(work, range(n)))
            finally:
                torch.set_num_threads(threads)
            outs = [parts[i % n][i // n] for i in range(len(chunks))]
        else:
            outs = [self._forward(c, j, self.reads[0]) for c in chunks]
        self.spent[0] += len(todo)
        for sets, (logp, margin, dist) in zip(chunks, outs):
            for b, s in enumerate(sets):
                self.memo[s, j] = (logp[b], margin[b])
                if dist is not None:
                    self.dists[s] = dist[b]

    @torch.no_grad()
    def _forward(self, sets: list, j: int, read):
        """(log p, margin, activation distance or None) of ``sets`` under fill ``j``."""
        m = torch.cat([self.mask(s) for s in sets])
        logits, acts = read(m * self.x + (1 - m) * self.fills[j][None])
        dist = None
        if self.search.act and j == 0:       # the taps' distance over the first fill
            dist = torch.stack([self._distance([a[b:b + 1] for a in acts]).reshape(())
                                for b in range(len(sets))]).cpu()
        return (logits.log_softmax(-1)[:, self.target].cpu(), self._margin(logits).cpu(),
                dist)

    def _margin(self, logits: torch.Tensor) -> torch.Tensor:
        other = logits.clone()
        other[:, self.target] = -float("inf")
        return logits[:, self.target] - other.max(-1).values

    def _distance(self, acts_e) -> torch.Tensor:
        return activation_matching(self.acts_x, acts_e, self.alphas, self.kinds, self.cdims)


def _chunks(n: int, step: int):
    """(start, end) of the first item alone, then of ``step`` items at a time, over n."""
    bounds = [0] + list(range(1, n, step)) + [n]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def holding(logp: torch.Tensor, kept: torch.Tensor, floor: float) -> torch.Tensor:
    """Per set scored: whether the decision holds (top-1 under every fill, and p_target under
    the first at least ``floor``)."""
    return kept.all(1) & (logp[:, 0].exp() >= floor)


def _labels(labels: np.ndarray, device):
    """(``labels`` + 1 as a tensor, 0 where no piece, the number of pieces k): a set's mask
    is one lookup per pixel, not a sum of k masks (2 ms a set of 40 at 224 px)."""
    return torch.from_numpy(labels + 1).long().to(device), int(labels.max()) + 1


def finer(hm, x, search: RegionSearch, segments: int, mask: torch.Tensor) -> np.ndarray:
    """Labels 0..k-1 of the pieces a finer SLIC of ``x`` (``segments`` superpixels) cuts
    ``mask`` into, -1 outside."""
    fine = superpixels(hm, x, replace(search, segments=segments))
    inside = mask[0, 0].cpu().numpy() > 0
    out = np.full(fine.shape, -1)
    for k, i in enumerate(np.unique(fine[inside])):
        out[(fine == i) & inside] = k
    return out
