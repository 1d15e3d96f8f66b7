"""Images in, model-ready tensors out: files, folders and the offline sample photos.

>>> x = load_image("coffee", hm)           # scikit-image's sample photo, hm's preprocessing
>>> x = load_image("photos/dog.png", hm)   # grey, RGBA, palette and 16-bit files become RGB
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import CircuitlabError, did_you_mean

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

# name -> (package, how to get an RGB uint8 array). Photos that ship inside installed wheels.
SAMPLES = {
    "coffee": ("skimage", "coffee"),
    "chelsea": ("skimage", "chelsea"),
    "rocket": ("skimage", "rocket"),
    "astronaut": ("skimage", "astronaut"),
    "cat": ("skimage", "cat"),
    "china": ("sklearn", "china.jpg"),
    "flower": ("sklearn", "flower.jpg"),
    "grace_hopper": ("matplotlib", "grace_hopper.jpg"),
}
_PIP = {"skimage": "scikit-image", "sklearn": "scikit-learn", "matplotlib": "matplotlib"}


def _sample_array(name: str) -> np.ndarray:
    package, item = SAMPLES[name]
    try:
        mod = importlib.import_module(package)
    except ImportError:
        raise CircuitlabError(f"the sample {name!r} ships with {_PIP[package]}: pip install "
                              f"{_PIP[package]}") from None
    if package == "skimage":
        importlib.import_module("skimage.data")
        return getattr(mod.data, item)()
    if package == "sklearn":
        from sklearn.datasets import load_sample_image
        return load_sample_image(item)
    path = Path(mod.get_data_path()) / "sample_data" / item
    return np.asarray(Image.open(path).convert("RGB"))


# Loadable by name but not listed: scikit-image's cat() is the chelsea photo, and a listed
# duplicate would put an image among its own references (mean ablation) or count it twice.
DUPLICATES = {"cat": "chelsea"}


def available_samples() -> list[str]:
    """Distinct sample names whose package is installed."""
    ok = []
    for name, (package, _) in SAMPLES.items():
        if name not in DUPLICATES and importlib.util.find_spec(package) is not None:
            ok.append(name)
    return ok


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB from any PIL mode: 16-bit and 32-bit grey are rescaled, alpha is composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    elif img.mode == "F":
        arr = np.asarray(img)
        lo, hi = float(arr.min()), float(arr.max())
        img = Image.fromarray(((arr - lo) / (hi - lo + 1e-12) * 255).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("RGB")


def open_image(path_or_sample: Union[str, os.PathLike]) -> Image.Image:
    """An RGB PIL image from a file path or a sample name (see ``SAMPLES``)."""
    src = os.fspath(path_or_sample)
    path = Path(src)
    if path.is_file():
        try:
            with Image.open(path) as img:
                img.load()
                return to_rgb(img)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise CircuitlabError(f"cannot read {src!r} as an image ({type(e).__name__}); "
                                  f"is it a PNG or JPEG file?") from None
    if path.is_dir():
        raise CircuitlabError(f"{src!r} is a folder; pass one image (the CLI takes folders)")
    if src.startswith("synthetic:") and src[10:].isdigit():
        return _synthetic_image(int(src[10:]))
    name = src.split(":", 1)[-1] if ":" in src and not path.suffix else src
    if name in SAMPLES:
        arr = _sample_array(name)
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, -1)
        return to_rgb(Image.fromarray(arr))
    raise CircuitlabError(f"no image file or sample called {src!r}.{did_you_mean(src, SAMPLES)}"
                          f" Samples: {', '.join(available_samples())}, synthetic:<i>")


def _synthetic_image(i: int) -> Image.Image:
    """Image ``i`` of the synthetic benchmark's held-out set (seed 123, as the benchmarks)."""
    from .synthetic import make_dataset
    if i > 9999:
        raise CircuitlabError("synthetic:<i> takes i from 0 to 9999")
    arr = make_dataset(i + 1, seed=123).images[i].permute(1, 2, 0).numpy()
    return Image.fromarray((arr * 255).round().astype(np.uint8))


def image_files(folder: Union[str, os.PathLike]) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CircuitlabError(f"{str(folder)!r} is not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CircuitlabError(f"folder {str(folder)!r} holds no image files "
                              f"({', '.join(IMAGE_SUFFIXES)})")
    return files


def make_transform(config: dict):
    """The eval transform of a timm-style data config (resize, center crop, normalise)."""
    from timm.data import create_transform
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return create_transform(**{k: config[k] for k in keys if k in config}, is_training=False)


def _config_of(model_or_config) -> dict:
    from .hooked_model import IMAGENET_CONFIG
    if model_or_config is None:
        return dict(IMAGENET_CONFIG)
    if isinstance(model_or_config, dict):
        return {**IMAGENET_CONFIG, **model_or_config}
    cfg = getattr(model_or_config, "data_config", None)
    if cfg is None:
        raise CircuitlabError("pass a HookedModel or a data config dict to load_image")
    return cfg


def load_image(path_or_sample: Union[str, os.PathLike, Image.Image],
               model_or_config=None) -> torch.Tensor:
    """A (1, 3, H, W) float tensor preprocessed with the model's own data config.

    ``model_or_config`` is a HookedModel, a timm-style data config dict, or None (ImageNet
    defaults at 224 px).
    """
    img = path_or_sample if isinstance(path_or_sample, Image.Image) else open_image(
        path_or_sample)
    return make_transform(_config_of(model_or_config))(to_rgb(img)).unsqueeze(0)


def _mean_std(x: torch.Tensor, model_or_config):
    cfg = _config_of(model_or_config)
    shape = (-1, 1, 1)  # broadcasts over (C, H, W) and (B, C, H, W)
    return (torch.tensor(cfg["mean"], dtype=x.dtype, device=x.device).view(shape),
            torch.tensor(cfg["std"], dtype=x.dtype, device=x.device).view(shape))


def normalize(pix: torch.Tensor, model_or_config=None) -> torch.Tensor:
    """[0, 1] RGB -> the model's normalised input space (0 = the dataset mean)."""
    mean, std = _mean_std(pix, model_or_config)
    return (pix - mean) / std


def denormalize(x: torch.Tensor, model_or_config=None) -> torch.Tensor:
    """Undo the normalisation: model input space -> [0, 1] RGB (for display)."""
    mean, std = _mean_std(x, model_or_config)
    return (x * std + mean).clamp(0, 1)
