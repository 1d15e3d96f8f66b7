"""How a model wants its pixels: the typed data config, its eval transform, (de)normalisation,
and the checks an input batch must pass (``check_batch``).

A leaf: it imports nothing of circuitlab but ``errors``. The keys are timm's
(``resolve_data_config``), declared once here; a ``DataConfig`` reads like the dict timm
returns (``cfg["mean"]``, ``dict(cfg)``, ``{**cfg}``) but is frozen and checked.

>>> cfg = DataConfig.of({"input_size": (3, 32, 32)})     # the rest from ImageNet's defaults
>>> x = normalize(pixels, cfg)                            # [0, 1] RGB -> model input
>>> rgb = denormalize(x, hm)                              # and back, for display
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Optional

import torch

from .errors import CircuitlabError

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos", "random")


@dataclass(frozen=True, eq=False)
class DataConfig(Mapping):
    """A timm-style data config: input size (C, H, W), resize interpolation, per-channel mean
    and std of the normalisation, and the centre crop (``crop_pct`` of the resized side)."""

    input_size: tuple = (3, 224, 224)
    interpolation: str = "bilinear"
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    crop_pct: float = 0.875
    crop_mode: str = "center"

    def __post_init__(self):
        try:
            size = tuple(int(v) for v in self.input_size)
            mean = tuple(float(v) for v in self.mean)
            std = tuple(float(v) for v in self.std)
            crop = float(self.crop_pct)
        except (TypeError, ValueError):
            raise CircuitlabError(f"data config values must be numbers: input_size "
                                  f"{self.input_size!r}, mean {self.mean!r}, std {self.std!r}, "
                                  f"crop_pct {self.crop_pct!r}") from None
        if len(size) != 3 or min(size) < 1:
            raise CircuitlabError(f"input_size must be (C, H, W) of positive sizes, got "
                                  f"{self.input_size!r}")
        if not mean or len(mean) != len(std) or min(std) <= 0:
            raise CircuitlabError(f"mean and std need one value per channel and std > 0, got "
                                  f"mean {mean} and std {std}")
        if not 0 < crop <= 1 or self.interpolation not in INTERPOLATIONS:
            raise CircuitlabError(f"crop_pct must be in (0, 1] and interpolation one of "
                                  f"{', '.join(INTERPOLATIONS)}; got {crop}, "
                                  f"{self.interpolation!r}")
        for name, value in (("input_size", size), ("mean", mean), ("std", std),
                            ("crop_pct", crop)):
            object.__setattr__(self, name, value)

    @classmethod
    def of(cls, config: Any = None) -> "DataConfig":
        """A DataConfig from None (ImageNet's), a DataConfig, a (partial) mapping whose missing
        keys come from ImageNet's, or anything with a ``data_config`` (a HookedModel)."""
        if config is None:
            return cls()
        if isinstance(config, DataConfig):
            return config
        if not isinstance(config, Mapping):
            inner = getattr(config, "data_config", None)
            if inner is None:
                raise CircuitlabError(f"expected a HookedModel or a data config dict, got "
                                      f"{type(config).__name__}")
            return cls.of(inner)
        unknown = sorted(set(config) - set(KEYS))
        if unknown:
            raise CircuitlabError(f"unknown data config key(s) {unknown}; the keys are "
                                  f"{', '.join(KEYS)}")
        return cls(**config)

    def replace(self, **changes) -> "DataConfig":
        return replace(self, **changes)

    # Mapping: reads like the dict timm's resolve_data_config returns
    def __getitem__(self, key: str):
        if key not in KEYS:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self):
        return iter(KEYS)

    def __len__(self) -> int:
        return len(KEYS)

    def __repr__(self) -> str:
        return f"DataConfig({', '.join(f'{k}={v!r}' for k, v in self.items())})"


KEYS = tuple(f.name for f in fields(DataConfig))
IMAGENET = DataConfig()


def make_transform(config: Any = None):
    """The eval transform of a data config (resize, centre crop, to tensor, normalise)."""
    from timm.data import create_transform
    return create_transform(**dict(DataConfig.of(config)), is_training=False)


def _mean_std(x: torch.Tensor, config: Optional[Any]):
    cfg = DataConfig.of(config)
    shape = (-1, 1, 1)  # broadcasts over (C, H, W) and (B, C, H, W)
    return (torch.tensor(cfg.mean, dtype=x.dtype, device=x.device).view(shape),
            torch.tensor(cfg.std, dtype=x.dtype, device=x.device).view(shape))


def normalize(pix: torch.Tensor, config: Any = None) -> torch.Tensor:
    """[0, 1] RGB -> the model's normalised input space (0 = the dataset mean). ``config``: a
    HookedModel, a data config (dict or DataConfig), or None for ImageNet's."""
    mean, std = _mean_std(pix, config)
    return (pix - mean) / std


def denormalize(x: torch.Tensor, config: Any = None) -> torch.Tensor:
    """Undo the normalisation: model input space -> [0, 1] RGB (for display)."""
    mean, std = _mean_std(x, config)
    return (x * std + mean).clamp(0, 1)


def check_batch(x, in_chans: int, model: str) -> None:
    """One clear error for what a model's input batch cannot be: not a float tensor of shape
    (B, C, H, W) with B >= 1 and ``in_chans`` channels, or with NaN or infinite values
    (``model``: its name, for the message)."""
    if not isinstance(x, torch.Tensor):
        raise CircuitlabError(f"expected an image batch as a torch tensor, got "
                              f"{type(x).__name__}; load images with circuitlab.data."
                              f"load_image")
    if x.dim() == 3:
        raise CircuitlabError(f"expected a batch (B, C, H, W), got one image of shape "
                              f"{tuple(x.shape)}; add the batch axis with x[None]")
    if x.dim() != 4:
        raise CircuitlabError(f"expected a batch (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise CircuitlabError("the batch is empty (B = 0); pass at least one image")
    if x.shape[1] != in_chans:
        raise CircuitlabError(f"{model} takes {in_chans}-channel images, got "
                              f"{x.shape[1]} channels (shape {tuple(x.shape)}); "
                              f"load_image converts grey and RGBA files to RGB")
    if not x.is_floating_point():
        raise CircuitlabError(f"expected a float image tensor, got {x.dtype}; preprocess "
                              f"with circuitlab.data.load_image or hm.data_config")
    if not torch.isfinite(x).all():
        raise CircuitlabError("the input contains NaN or infinite values")
