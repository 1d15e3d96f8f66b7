"""Objective weights, taps, generator and optimiser settings; the presets."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional

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
