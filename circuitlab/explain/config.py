"""Objective weights, taps, generator and optimiser settings; the presets; the region
search's settings (``RegionSearch``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional, Union

from ..backgrounds import KINDS, RANDOM_KINDS
from ..errors import CircuitlabError
from ..execution import Execution


@dataclass(frozen=True)
class ExplainConfig:
    """Everything one explanation run depends on. ``None`` fields are filled from the model."""

    # objective weights (lambda): activation matching, CE, KL, area, binarisation, TV,
    # sufficiency (robustness to backgrounds), necessity (the complement must lose the label)
    # (defaults: tuned on the synthetic benchmark's CNN; preset() adapts them to large inputs)
    act: float = 0.05
    ce: float = 4.0
    kl: float = 0.4
    area: float = 15.0
    bin: float = 0.3
    tv: float = 75.0
    rob: float = 0.0
    nec: float = 5.0
    area_mode: str = "mean"               # mean: lambda * mean(p); schedule: sorted-mask gap
    area_start: float = 1.0               # schedule: the kept fraction goes from area_start to
    area_end: float = 0.02                # area_end geometrically over the steps
    # a hard area budget instead of the area term: the mask keeps exactly this fraction of its
    # cells (the top keep probabilities, straight-through), shrinking geometrically from the
    # whole image over the first ``budget_warmup`` of the steps; None: the mask's own size
    area_budget: Optional[float] = None
    budget_warmup: float = 0.5
    taps: Optional[tuple] = None          # hook names; None = the family's taps
    alphas: Optional[tuple] = None        # per-tap weights; None = 1, 2, 2, 4, 8 style ramp
    distances: Optional[tuple] = None     # per-tap distance; None = cosine shallow, zmse deep
    temperature: float = 2.0
    tv_neighbours: int = 4
    backgrounds: tuple = ("grey", "gaussian", "uniform", "blur")
    backgrounds_per_step: int = 1         # drawn at random from ``backgrounds`` each step
    necessity_mode: str = "prob"
    necessity_margin: float = 0.5
    # generator: "grid" (free logits per cell), "smooth" (free logits on a coarse grid of
    # coarse_size cells, upsampled bilinearly to mask_size) or "unet" (the paper's U-Net)
    generator: str = "grid"
    mask_size: int = 32                   # grid: cells per side (capped at the input size)
    coarse_size: int = 14
    smooth_start: Optional[float] = None  # smooth: cells start near this keep probability
    #                                       (shrinking from the image); None: a random mask
    width: int = 16
    depth: int = 3
    out_stride: int = 4                   # of the generator's input
    input_scale: int = 2                  # generator sees the image average-pooled by this
    init_keep: Optional[float] = 0.9      # None: default init (a random first mask, the paper)
    # optimiser
    lr: float = 0.1
    steps: int = 100
    min_steps: int = 20
    patience: int = 10                    # early stop: binary, label kept, area flat this long
    # how the classifier runs in the loop (readers.Execution): fp32 or bf16 autocast, a
    # torch.compile mode (reduce-overhead: CUDA graphs), channels-last layout, BatchNorm
    # folded into the convolutions
    precision: str = "fp32"
    compile: Optional[str] = None
    channels_last: bool = False
    fold_batchnorm: bool = False

    def replace(self, **changes) -> "ExplainConfig":
        unknown = set(changes) - set(asdict(self))
        if unknown:
            raise CircuitlabError(f"unknown explain settings {sorted(unknown)}")
        return replace(self, **changes)

    @property
    def execution(self) -> Execution:
        return Execution(self.precision, self.compile, self.channels_last,
                         self.fold_batchnorm)

    def with_execution(self, e: Execution) -> "ExplainConfig":
        return self.replace(**asdict(e))

    def __post_init__(self):
        self.execution  # validates precision and compile mode
        b = self.area_budget
        if b is not None and not 0 < b <= 1:
            raise CircuitlabError(f"area_budget is the kept fraction, in (0, 1]; got {b}")
        if self.smooth_start is not None and not 0 < self.smooth_start < 1:
            raise CircuitlabError(f"smooth_start is a keep probability, in (0, 1); got "
                                  f"{self.smooth_start}")
        if not 0 <= self.budget_warmup <= 1:
            raise CircuitlabError(f"budget_warmup is a fraction of the steps, in [0, 1]; got "
                                  f"{self.budget_warmup}")


PRESETS = {
    # The authors' ResNet-18 code: lambda = 10/15/5/100/1/500/100, no necessity term, 8-neighbour
    # TV, a full-resolution U-Net 32..512 from a random init, Adam 5e-5 for 880 steps, the three
    # backgrounds of their robustness term every step.
    "paper": ExplainConfig(act=10, ce=15, kl=5, area=100, bin=1, tv=500, rob=100, nec=0,
                           tv_neighbours=8, backgrounds=("grey", "gaussian", "uniform"),
                           backgrounds_per_step=3, generator="unet", width=32, depth=4,
                           out_stride=1,
                           input_scale=1,
                           init_keep=None, lr=5e-5, steps=880, min_steps=880, patience=880),
    "default": ExplainConfig(),
}


# inputs at least this many pixels a side are photos (ImageNet-sized): their own presets here,
# and `circuitlab explain` explains them with superpixel regions by default
LARGE_INPUT = 128

# ImageNet-sized inputs (>= LARGE_INPUT px): chosen by a random search over 45 settings on five
# photos with EfficientNet-Lite0; what it bought: docs/results.md, "Explanation presets".
_LARGE_INPUT = dict(area=100.0, tv=150.0, bin=1.0, mask_size=56, lr=0.05, steps=80)


# ... and under an area budget (explain_at_area): more steps, no necessity term, one mask cell
# per pixel with TV scaled to the finer grid; tuned on photos that are not among the reported
# ones (china, grace_hopper, the skimage motorcycle); docs/results.md, "Explanation presets".
_LARGE_INPUT_BUDGET = dict(steps=120, nec=0.0)


def _budget_grid(cfg: "ExplainConfig", image_size: int) -> "ExplainConfig":
    """One mask cell per pixel, TV per neighbour pair scaled to the finer grid."""
    return cfg.replace(mask_size=image_size, tv=cfg.tv * image_size / cfg.mask_size)


def preset(name: str, family: str = "generic", image_size: Optional[int] = None,
           **overrides) -> ExplainConfig:
    """A named preset (``paper`` or ``default``) for a model family and input size."""
    if name not in PRESETS:
        raise CircuitlabError(f"unknown preset {name!r}; use one of {sorted(PRESETS)}")
    cfg = PRESETS[name]
    if name == "default" and image_size is not None and image_size >= LARGE_INPUT:
        cfg = cfg.replace(**_LARGE_INPUT)
        if overrides.get("area_budget") is not None:
            cfg = _budget_grid(cfg.replace(**_LARGE_INPUT_BUDGET), image_size)
    return cfg.replace(**overrides) if overrides else cfg


def default_alphas(n: int) -> tuple:
    """1, 2, 2, 4, 8 for five taps (the paper); for other counts a ramp ending at 8."""
    if n == 5:
        return (1.0, 2.0, 2.0, 4.0, 8.0)
    if n == 3:
        return (1.0, 2.0, 8.0)
    return tuple(float(2 ** round(3 * i / max(1, n - 1))) for i in range(n))


def default_distances(n: int, tokens: bool) -> tuple:
    """Cosine over channels for the two shallow taps, z-scored MSE deeper (the authors' code);
    cosine for every tap of a transformer (``tokens``; the paper's choice for token
    features)."""
    if tokens:
        return ("cosine",) * n
    return tuple("cosine" if i < min(2, n - 1) else "zmse" for i in range(n))


def amortized_preset(family: str = "generic", image_size: Optional[int] = None,
                     **overrides) -> ExplainConfig:
    """The amortized generator: a U-Net whose mask logits sit on the per-image grid, trained
    with Adam 3e-3 for ``steps`` batches to reproduce per-image masks of the ``default``
    preset. Below 128 px it sees the image and outputs full resolution; above, it sees the
    image at half size and outputs at stride 2 of that (56 cells for 224 px), which keeps one
    forward under 10 ms on a 2-core CPU."""
    cfg = preset("default", family, image_size)
    small = image_size is None or image_size < LARGE_INPUT
    cfg = cfg.replace(generator="unet", lr=3e-3, steps=600, min_steps=0, width=16, depth=3,
                      out_stride=1 if small else 2, input_scale=1 if small else 2,
                      init_keep=None)
    return cfg.replace(**overrides) if overrides else cfg


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
    # took under 10 %: docs/results.md, "Superpixel regions". With a tuple, again along each
    # next SLIC while the set is still larger, each later cut sweeping down one ranking a
    # round: 512 after 256 took the two photos the first cut left over 10 % under it, the
    # other six masks unchanged (same page)
    refine: Union[int, tuple, None] = (256, 512)
    refine_above: float = 0.1
    # backward elimination (prune, cut) keeps at least ``region_share`` of the set's pixels
    # in its ``region_top`` largest connected regions (or the share it had, where less; 0:
    # off): cut along the finer SLIC without it, motorcycle's one region of 11.6 % ended as
    # 5.9 % in eight, 0.84 of it in the largest five (docs/results.md, "Superpixel regions")
    region_top: int = 5
    region_share: float = 0.9
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
    # forwards run at once on a CPU, each in one thread on its own copy of the model: on 2
    # cores two single-threaded forwards outran one forward on both (docs/results.md,
    # "Superpixel regions"); None: torch's thread count, at most 8 (one on a GPU)
    workers: Optional[int] = None
    # the sets scored by a copy of the model with its BatchNorms folded into the convolutions
    # (``folding``): the same logits up to float rounding and the same masks on the photos,
    # in fewer operations a forward (docs/results.md, "Superpixel regions")
    fold_batchnorm: bool = True
    # on a CPU (fp32, act 0) the sets scored through the model's ahead-of-time compiled
    # package (``aot``: compiled once per model, input size and CPU, then cached on disk),
    # one forward at a time on every thread: the same masks in less time than the eager
    # workers (docs/results.md, "Superpixel regions"); False, or where it cannot compile:
    # the eager model
    compiled: bool = True
    # robust: the set found is grown on by whole superpixels around it, by its worst logit
    # margin, until top-1 holds by at least ``robust_margin`` over the mean colour and
    # ``robust_draws`` fresh draws of each noise fill (a stream of their own), to at most
    # ``robust_within`` of the image, and pruned again under them; 0: off. The masks that
    # hold over one noise draw lose the label under most fresh ones, and a set kept under
    # every fresh draw needs 4-40 % of the image (docs/results.md, "Superpixel regions")
    robust_draws: int = 0
    robust_margin: float = 0.5
    robust_within: float = 0.4

    @property
    def refine_passes(self) -> tuple:
        """The finer SLICs' superpixel counts, in the order the set is cut along them."""
        r = self.refine
        return () if r is None else (r,) if isinstance(r, int) else tuple(r)

    @property
    def robust_fills(self) -> tuple:
        """The fills the robust growth holds under: the first fill, then ``robust_draws``
        draws of each random fill of ``fills``."""
        noise = [k for k in dict.fromkeys(self.fills[1:]) if k in RANDOM_KINDS]
        return self.fills[:1] + tuple(k for k in noise for _ in range(self.robust_draws))

    def __post_init__(self):
        if not 2 <= self.segments <= 1024:
            raise CircuitlabError(f"segments is how many superpixels, 2 to 1024; got "
                                  f"{self.segments}")
        if isinstance(self.refine, list):
            object.__setattr__(self, "refine", tuple(self.refine))
        if not isinstance(self.refine, (int, tuple, type(None))) or not all(
                isinstance(k, int) and 2 <= k <= 1024 for k in self.refine_passes):
            raise CircuitlabError(f"refine is how many superpixels the finer pass cuts the "
                                  f"image into, 2 to 1024, a tuple of them (one pass each), or "
                                  f"None; got {self.refine!r}")
        if not 0 <= self.refine_above <= 1:
            raise CircuitlabError(f"refine_above is a fraction of the image, in [0, 1]; got "
                                  f"{self.refine_above}")
        if self.region_top < 1 or not 0 <= self.region_share <= 1:
            raise CircuitlabError(f"region_top is how many regions, at least 1, and "
                                  f"region_share a fraction of the mask, in [0, 1] (0: off); "
                                  f"got {self.region_top}, {self.region_share}")
        if self.workers is not None and self.workers < 1:
            raise CircuitlabError(f"workers is how many forwards run at once, at least 1; got "
                                  f"{self.workers}")
        if self.batch_size is not None and self.batch_size < 1:
            raise CircuitlabError(f"batch_size is how many sets a forward scores, at least 1; "
                                  f"got {self.batch_size}")
        if self.confident_within is not None and not 0 < self.confident_within <= 1:
            raise CircuitlabError(f"confident_within is a fraction of the image, in (0, 1], "
                                  f"or None; got {self.confident_within}")
        if not self.fills or not all(k in KINDS for k in self.fills):
            raise CircuitlabError(f"fills: one or more of {', '.join(KINDS)} (a kind twice is "
                                  f"two draws), e.g. ('grey', 'gaussian'); got {self.fills!r}")
        if self.robust_draws < 0 or self.robust_margin < 0 or not 0 < self.robust_within <= 1:
            raise CircuitlabError(f"robust_draws >= 0 (0: off), robust_margin >= 0 (logits) and "
                                  f"robust_within in (0, 1]; got {self.robust_draws}, "
                                  f"{self.robust_margin}, {self.robust_within}")
        if self.robust_draws and len(self.robust_fills) == 1:
            raise CircuitlabError(f"robust_draws: fresh draws of the random fills among fills "
                                  f"({', '.join(RANDOM_KINDS)}); {self.fills!r} has none: add "
                                  f"one")
        if not self.scores or not all(
                isinstance(st, (tuple, list)) and len(st) == 2 and st[0] in SCORES and
                isinstance(st[1], (int, float)) and 0 < st[1] <= 1 for st in self.scores):
            raise CircuitlabError(f"scores: one or more (score, largest area) pairs, the score "
                                  f"one of {', '.join(SCORES)} and the area in (0, 1], tried in "
                                  f"turn, e.g. (('logp', 0.15), ('margin', 0.3)); got "
                                  f"{self.scores!r}")
