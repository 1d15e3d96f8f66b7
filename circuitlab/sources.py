"""How each source of architectures builds a model: the offline ImageNet packages, circuitlab's
own architectures, timm and torchvision.

A builder takes ``(arch, pretrained, kwargs)`` and returns the module. With ``pretrained`` true
it loads real weights or raises: a random model's explanation is not an explanation, so a
random initialisation is built only when asked for (``pretrained=False``). ``registry.SOURCES``
declares which names each source answers to; ``zoo.load_model`` calls them.
"""
from __future__ import annotations

import importlib
import os
import socket
from typing import Callable, Optional

import torch
from torch import nn

from .errors import CircuitlabError
from .preprocessing import KEYS, DataConfig

RANDOM_HINT = "pass pretrained=False (CLI: --random-weights) for a random initialisation"


# ---------------------------------------------------------------------------- data configs
def timm_data_config(model: nn.Module) -> DataConfig:
    """The preprocessing timm declares for a model (size, interpolation, mean, std, crop)."""
    from timm.data import resolve_data_config
    cfg = resolve_data_config({}, model=model)
    return DataConfig.of({k: cfg[k] for k in KEYS if k in cfg})


def default_data_config(model: nn.Module) -> DataConfig:
    """ImageNet preprocessing at 224 px: what torchvision's classifiers and ours expect."""
    return DataConfig()


# ---------------------------------------------------------------------------- offline weights
def lite_state_dict(raw: dict, model: nn.Module) -> dict:
    """Rename EfficientNet-PyTorch (lukemelas-style) keys to timm ``tf_efficientnet_lite*``.

    Blocks are numbered flat there (``_blocks.7``) and per stage in timm (``blocks.3.1``); a
    block without ``_expand_conv`` is timm's DepthwiseSeparableConv, the rest InvertedResidual.
    """
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
           "_fc": "classifier"}
    ds = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    ir = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
          "_project_conv": "conv_pwl", "_bn2": "bn3"}
    flat = [f"blocks.{i}.{j}" for i, stage in enumerate(model.blocks) for j in range(len(stage))]
    expands = {k.split(".")[1] for k in raw if k.startswith("_blocks.") and "_expand_conv" in k}
    out = {}
    for key, value in raw.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            idx, mod, rest = parts[1], parts[2], ".".join(parts[3:])
            table = ir if idx in expands else ds
            out[f"{flat[int(idx)]}.{table[mod]}.{rest}"] = value
        else:
            out[f"{top[parts[0]]}.{'.'.join(parts[1:])}"] = value
    return out


def offline_builder(models: dict) -> Callable:
    """A builder for ``models`` (name -> ``registry.OfflineModel``): the packaged weights,
    remapped strictly into timm; without them, the timm architecture at random."""
    def build(name: str, pretrained: bool, kwargs: dict) -> nn.Module:
        import timm
        spec = models[name]
        if not pretrained:
            return timm.create_model(spec.timm_arch, pretrained=False, **kwargs)
        if {k: v for k, v in kwargs.items() if (k, v) != ("num_classes", 1000)}:
            raise CircuitlabError(f"{name} ships with fixed ImageNet weights; use "
                                  f"{spec.timm_arch} to build a modified architecture")
        package = spec.package.replace("_", "-")
        try:
            pkg = importlib.import_module(spec.package)
        except ImportError:
            raise CircuitlabError(f"{name} needs the package {package}: pip install "
                                  f"{package}") from None
        raw = torch.load(getattr(pkg, spec.file_class).get_model_file_path(),
                         map_location="cpu", weights_only=True)
        model = timm.create_model(spec.timm_arch, pretrained=False)
        model.load_state_dict(lite_state_dict(raw, model), strict=True)
        return model
    return build


def local_builder(archs: dict) -> Callable:
    """A builder for architectures defined in circuitlab (name -> constructor): no hub
    weights exist for them, so they load from a checkpoint or start at random on request."""
    def build(arch: str, pretrained: bool, kwargs: dict) -> nn.Module:
        if pretrained:
            raise CircuitlabError(f"{arch} has no pretrained weights; load a checkpoint, or "
                                  f"{RANDOM_HINT}")
        return archs[arch](**kwargs)
    return build


# ---------------------------------------------------------------------------- hubs
def hub_reachable(host: str, timeout: float = 3.0) -> bool:
    # huggingface_hub retries for ~45 s with no network; ask the resolver once instead.
    if os.environ.get("CIRCUITLAB_OFFLINE") or os.environ.get("HF_HUB_OFFLINE"):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _from_hub(arch: str, pretrained: bool, build: Callable, host: str,
              offline: Optional[Callable] = None) -> nn.Module:
    """``build(pretrained)``; weights from the hub when it answers, else from its local
    cache (``offline`` wraps the call so that the hub library does not try the network)."""
    if not pretrained:
        return build(False)
    try:
        if hub_reachable(host) or offline is None:
            return build(True)  # torchvision looks in its cache before downloading
        return offline(lambda: build(True))
    except (CircuitlabError, TypeError):  # a TypeError is a bad architecture argument
        raise
    except Exception as e:  # no network, no cached copy, or no pretrained weights exist
        raise CircuitlabError(f"no pretrained weights for {arch} could be loaded: the hub "
                              f"did not answer and the local cache has none "
                              f"({type(e).__name__}); load a checkpoint, or {RANDOM_HINT}"
                              ) from None


def _hf_offline(call: Callable):
    import huggingface_hub.constants as hf_constants
    old, hf_constants.HF_HUB_OFFLINE = hf_constants.HF_HUB_OFFLINE, True
    try:
        return call()
    finally:
        hf_constants.HF_HUB_OFFLINE = old


def timm_build(arch: str, pretrained: bool, kwargs: dict) -> nn.Module:
    import timm
    return _from_hub(arch, pretrained,
                     lambda p: timm.create_model(arch, pretrained=p, **kwargs),
                     "huggingface.co", _hf_offline)


def torchvision_build(arch: str, pretrained: bool, kwargs: dict) -> nn.Module:
    import torchvision
    return _from_hub(arch, pretrained, lambda p: torchvision.models.get_model(
        arch, weights="DEFAULT" if p else None, **kwargs), "download.pytorch.org")


def torchvision_names() -> list[str]:
    import torchvision
    return list(torchvision.models.list_models(module=torchvision.models))


def prefixed(prefix: str, known: Callable[[str], bool]) -> Callable[[str], Optional[str]]:
    """A resolver for a hub: ``prefix/arch`` or a bare ``arch`` it knows -> ``arch``."""
    def resolve(name: str) -> Optional[str]:
        if "/" in name:
            head, arch = name.split("/", 1)
            return arch if head == prefix and known(arch) else None
        return name if known(name) else None
    return resolve
