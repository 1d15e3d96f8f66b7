"""circuitlab: minimal explanations and the circuits behind them, for CNN and ViT classifiers.

>>> import circuitlab
>>> hm = circuitlab.load_model("efficientnet_lite0")
>>> x = circuitlab.data.load_image("coffee", hm)
>>> logits, cache = hm.run_with_cache(x, names=hm.taps)
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Attributes load on first use, so `circuitlab --help` answers without importing torch.
_EXPORTS = {
    "ActivationCache": "cache", "CircuitlabError": "errors", "DataConfig": "preprocessing",
    "Family": "families", "HookPoint": "hook_points", "HookedModel": "hooked_model",
    "OFFLINE_MODELS": "registry", "load_model": "zoo", "save_checkpoint": "zoo",
}
_SUBMODULES = ("aot", "backgrounds", "baselines", "cache", "checkpoints", "circuits", "cli",
               "data", "errors", "explain", "families", "files", "hook_points",
               "hooked_model", "kernels", "metrics", "preprocessing", "registry", "report",
               "sources", "synthetic", "zoo")
__all__ = sorted(_EXPORTS) + ["data", "__version__"]

if TYPE_CHECKING:
    from . import data
    from .cache import ActivationCache
    from .errors import CircuitlabError
    from .families import Family
    from .hook_points import HookPoint
    from .hooked_model import HookedModel
    from .preprocessing import DataConfig
    from .registry import OFFLINE_MODELS
    from .zoo import load_model, save_checkpoint


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'circuitlab' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
