"""load_model: real offline weights, timm and torchvision by name, checkpoints, any nn.Module.

>>> hm = load_model("efficientnet_lite0")                 # real ImageNet weights, offline
>>> hm = load_model("resnet50")                           # timm; hub weights (or its cache)
>>> hm = load_model("torchvision/vgg11", pretrained=False)
>>> hm = load_model("resnet18", checkpoint="my_run.pt")   # weights_only=True
>>> hm = load_model(my_module, data_config={"input_size": (3, 32, 32)})
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn

from . import checkpoints, registry, synthetic
from .errors import CircuitlabError
from .hooked_model import HookedModel
from .preprocessing import DataConfig
from .registry import SYNTHETIC_MODELS, ArchSource


def imagenet_labels() -> list[str]:
    from timm.data import ImageNetInfo
    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(1000)]


def _labels_for(num_classes: int, labels):
    if labels is not None:
        labels = list(labels)
        if len(labels) != num_classes:
            raise CircuitlabError(f"got {len(labels)} labels for a model with {num_classes} "
                                  f"classes")
        return labels
    return imagenet_labels() if num_classes == 1000 else None


def _num_classes(model: nn.Module) -> Optional[int]:
    if hasattr(model, "num_classes"):
        return int(model.num_classes)
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    return last.out_features if last is not None else None


# ---------------------------------------------------------------------------- checkpoints
def _state_dict_of(obj: dict) -> dict:
    for key in ("state_dict", "model_state_dict", "model", "module"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CircuitlabError("the checkpoint holds no state_dict of tensors")
    # DataParallel / DDP prefixes
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _load_state(model: nn.Module, state: dict, where: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} here"
             for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise CircuitlabError(
            f"checkpoint {where} does not fit the architecture: {len(missing)} missing keys "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), "
            f"{len(wrong)} of another shape (e.g. {wrong[:1]}); check the model name")
    model.load_state_dict(state, strict=True)


def _classes_in_state(state: dict, model: nn.Module) -> Optional[int]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    head = cfg.get("classifier")
    head = head[0] if isinstance(head, (tuple, list)) else head
    for key in (f"{head}.weight", f"{head}.fc.weight") if head else ():
        if key in state:
            return int(state[key].shape[0])
    return None


def save_checkpoint(hm: Union[HookedModel, nn.Module], path: Union[str, os.PathLike], *,
                    arch: Optional[str] = None, arch_kwargs: Optional[dict] = None,
                    overwrite: bool = False) -> Path:
    """Write a self-describing checkpoint (weights + arch + preprocessing + labels) atomically.

    ``load_model(path)`` rebuilds the model from it with ``weights_only=True``.
    """
    hooked = isinstance(hm, HookedModel)
    model = hm.model if hooked else hm
    return checkpoints.save(path, "model", {
        "arch": arch or (hm.arch if hooked else None),
        "arch_kwargs": dict(arch_kwargs if arch_kwargs is not None
                            else getattr(hm, "arch_kwargs", {})),
        "state_dict": model.state_dict(),
        "data_config": dict(hm.data_config) if hooked else None,
        "labels": hm.labels if hooked else None,
    }, overwrite=overwrite)


# the ground-truth benchmark's models: trained here on first use (under a minute for the CNN,
# a few for the others), then loaded from the user cache
def _synthetic(name: str, device=None) -> HookedModel:
    hm = synthetic.synthetic_model(SYNTHETIC_MODELS[name],
                                   log=lambda s: print(f"circuitlab: {s}", file=sys.stderr))
    return _to_device(hm, device)


# ---------------------------------------------------------------------------- entry point
def load_model(name_or_module: Union[str, os.PathLike, nn.Module], checkpoint=None,
               device=None, *, pretrained: Optional[bool] = None,
               num_classes: Optional[int] = None, labels: Optional[Sequence[str]] = None,
               data_config: Optional[Mapping] = None, **arch_kwargs) -> HookedModel:
    """A HookedModel for a name, a circuitlab checkpoint file, or an ``nn.Module``.

    Names: ``efficientnet_lite0/1/2`` (real ImageNet weights from their PyPI packages, exact),
    the benchmark's ``synthetic-*`` models, any timm name (``resnet50``,
    ``vit_small_patch16_224``; ``timm/`` prefix optional) or torchvision name
    (``torchvision/resnet18``); ``registry.SOURCES`` declares them. A name loads with real
    weights (the hub, or its local cache) or not at all: offline without a cached copy it
    is refused, since a random model's explanation is not an explanation; ``pretrained=False``
    asks for a random initialisation on purpose. ``checkpoint`` loads a state_dict with
    ``weights_only=True`` (the class count is read from it). Extra keyword arguments go to the
    architecture (``img_size=32``, ``depth=4``, ...).
    """
    if isinstance(name_or_module, nn.Module):
        model, name, source = name_or_module, type(name_or_module).__name__, "module"
        cfg, kwargs, meta = DataConfig(), {}, {}
    else:
        name = os.fspath(name_or_module)
        if name in SYNTHETIC_MODELS:
            if checkpoint is not None or arch_kwargs or num_classes is not None:
                raise CircuitlabError(f"{name} is the benchmark's own trained model; to load "
                                      f"other weights pass the checkpoint file itself as the "
                                      f"model (load_model('file.pt'), --model file.pt)")
            return _synthetic(name, device)
        model, name, source, cfg, kwargs, meta = _from_name(
            name, checkpoint, pretrained is not False, num_classes, arch_kwargs)
    if data_config:
        cfg = DataConfig.of({**cfg, **data_config})
    labels = labels if labels is not None else meta.get("labels")
    classes = _num_classes(model)
    hm = HookedModel(model, name=name, data_config=cfg, source=source,
                     labels=_labels_for(classes, labels) if classes else labels,
                     arch=name, arch_kwargs=kwargs)
    return _to_device(hm, device)


def _from_name(name: str, checkpoint, pretrained: bool, num_classes: Optional[int],
               arch_kwargs: dict) -> tuple:
    """(model, name, source, data config, architecture arguments, checkpoint contents) for
    a registered name or a checkpoint file."""
    meta: dict = {}
    if name.endswith((".pt", ".pth", ".safetensors")) or Path(name).is_file():
        meta = checkpoints.read(name)
        if checkpoints.kind_of(meta) != "model" or not meta.get("arch"):
            raise CircuitlabError(f"{name!r} is not a circuitlab checkpoint (no arch "
                                  f"recorded); use load_model(ARCH, checkpoint={name!r})")
        checkpoint, name = name, meta["arch"]
        arch_kwargs = {**meta.get("arch_kwargs", {}), **arch_kwargs}
    elif checkpoint is not None:
        meta = checkpoints.read(checkpoint)
    source, arch = registry.resolve(name)
    state = _state_dict_of(meta) if meta else None
    kwargs = dict(arch_kwargs, **({} if num_classes is None else {"num_classes": num_classes}))
    model = _build(source, arch, pretrained and state is None, kwargs, state)
    if state is not None:
        _load_state(model, state, repr(os.fspath(checkpoint)))
    return model, name, source.source, _data_config(source, model, kwargs, meta), kwargs, meta


def _build(source: ArchSource, arch: str, pretrained: bool, kwargs: dict,
           state: Optional[dict]) -> nn.Module:
    """The architecture; a fine-tuned head in ``state`` sizes the classifier (and is
    recorded in ``kwargs``, so that a saved checkpoint rebuilds it)."""
    try:
        model = source.build(arch, pretrained, kwargs)
        found = _classes_in_state(state, model) if state is not None else None
        if "num_classes" not in kwargs and found not in (None, _num_classes(model)):
            kwargs["num_classes"] = found
            model = source.build(arch, False, kwargs)
    except TypeError as e:
        raise CircuitlabError(f"{arch} does not accept these arguments: {e}") from None
    return model


def _data_config(source: ArchSource, model: nn.Module, kwargs: dict, meta: dict) -> DataConfig:
    """The source's preprocessing, sized to the architecture's arguments; a checkpoint's
    recorded one wins."""
    if meta.get("data_config"):
        return DataConfig.of(meta["data_config"])
    cfg = source.data_config(model)
    if "img_size" in kwargs or "in_chans" in kwargs:  # the pretrained cfg lags behind
        size = kwargs.get("img_size", cfg.input_size[1:])
        size = (size, size) if isinstance(size, int) else tuple(size)
        cfg = cfg.replace(input_size=(kwargs.get("in_chans", cfg.input_size[0]), *size))
    return cfg


def _to_device(hm: HookedModel, device) -> HookedModel:
    if device is not None:
        try:
            hm.to(torch.device(device))
        except (RuntimeError, AssertionError) as e:
            raise CircuitlabError(f"cannot use device {device!r}: {e}") from None
    return hm
