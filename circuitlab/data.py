"""Images in, model-ready tensors out: files, folders and the offline sample photos.

>>> x = load_image("coffee", hm)           # scikit-image's sample photo, hm's preprocessing
>>> x = load_image("photos/dog.png", hm)   # grey, RGBA, palette and 16-bit files become RGB
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from . import synthetic
from .errors import CircuitlabError, did_you_mean
# re-exported: loading images and (de)normalising them is one topic for users
from .preprocessing import DataConfig, denormalize, make_transform, normalize

__all__ = ["SAMPLES", "IMAGE_SUFFIXES", "available_samples", "to_rgb", "open_image",
           "image_files", "load_image", "make_transform", "normalize", "denormalize"]

# an image whose short side is under 1/TINY of the model's input is warned about
TINY = 8
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
    "motorcycle": ("skimage", "stereo_motorcycle"),
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
        arr = getattr(mod.data, item)()
        return arr[0] if isinstance(arr, tuple) else arr   # a stereo pair: the left view
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
    _shadows(src, path)
    if path.is_file():
        try:
            with Image.open(path) as img:
                img.load()
                return to_rgb(img)
        except Image.DecompressionBombError as e:
            raise CircuitlabError(f"{src!r} is too large to decode safely ({e.args[0][:60]}"
                                  f"...); shrink it first, or raise PIL.Image.MAX_IMAGE_PIXELS "
                                  f"if you trust it") from None
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
    if i > 9999:
        raise CircuitlabError("synthetic:<i> takes i from 0 to 9999")
    arr = synthetic.make_dataset(i + 1, seed=123).images[i].permute(1, 2, 0).numpy()
    return Image.fromarray((arr * 255).round().astype(np.uint8))


def _shadows(src: str, path: Path) -> None:
    """Warn where a file or folder here has a sample's name: the path is what is read (a
    previous run's output folder called ``coffee`` would be explained instead of the
    photo)."""
    if src in SAMPLES and path.exists():
        warnings.warn(f"{src!r} is the {'folder' if path.is_dir() else 'file'} "
                      f"{path.resolve()} here, not the bundled sample; pass sample:{src} for "
                      f"the sample", stacklevel=3)


def image_files(folder: Union[str, os.PathLike]) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    _shadows(os.fspath(folder), Path(folder))
    folder = Path(folder)
    if not folder.is_dir():
        raise CircuitlabError(f"{str(folder)!r} is not a folder of images")
    files = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise CircuitlabError(f"folder {str(folder)!r} holds no image files "
                              f"({', '.join(IMAGE_SUFFIXES)})")
    return files


def load_image(path_or_sample: Union[str, os.PathLike, Image.Image],
               model_or_config=None) -> torch.Tensor:
    """A (1, 3, H, W) float tensor preprocessed with the model's own data config.

    ``model_or_config`` is a HookedModel, a data config (a timm-style dict, partial or whole,
    or a ``DataConfig``), or None (ImageNet defaults at 224 px).
    """
    img = path_or_sample if isinstance(path_or_sample, Image.Image) else open_image(
        path_or_sample)
    cfg = DataConfig.of(model_or_config)
    if min(img.size) < min(cfg.input_size[1:]) // TINY:
        warnings.warn(f"the image is {img.size[0]}x{img.size[1]} pixels, upsampled to "
                      f"{cfg.input_size[2]}x{cfg.input_size[1]}: there is little to explain "
                      f"in it", stacklevel=2)
    return make_transform(cfg)(to_rgb(img)).unsqueeze(0)
