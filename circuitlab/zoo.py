"""load_model: real offline weights, timm and torchvision by name, checkpoints, any nn.Module.

>>> hm = load_model("efficientnet_lite0")                 # real ImageNet weights, offline
>>> hm = load_model("resnet50")                           # timm; hub weights if reachable
>>> hm = load_model("torchvision/vgg11", pretrained=False)
>>> hm = load_model("resnet18", checkpoint="my_run.pt")   # weights_only=True
>>> hm = load_model(my_module, data_config={"input_size": (3, 32, 32)})
"""
from __future__ import annotations

import importlib
import os
import socket
import sys
import warnings
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn

from . import checkpoints, synthetic
from .errors import CircuitlabError, did_you_mean
from .hooked_model import HookedModel
from .preprocessing import KEYS, DataConfig
from .registry import OFFLINE_MODELS, SYNTHETIC_MODELS


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


# ---------------------------------------------------------------------------- offline weights
def _lite_state_dict(raw: dict, model: nn.Module) -> dict:
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


def _load_offline(name: str) -> tuple[nn.Module, DataConfig]:
    import timm
    spec = OFFLINE_MODELS[name]
    try:
        pkg = importlib.import_module(spec.package)
    except ImportError:
        raise CircuitlabError(f"{name} needs the package {spec.package.replace('_', '-')}: pip "
                              f"install {spec.package.replace('_', '-')}") from None
    path = getattr(pkg, spec.file_class).get_model_file_path()
    raw = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model(spec.timm_arch, pretrained=False)
    model.load_state_dict(_lite_state_dict(raw, model), strict=True)
    return model, _timm_data_config(model)


# ---------------------------------------------------------------------------- timm / torchvision
def _timm_data_config(model: nn.Module) -> DataConfig:
    from timm.data import resolve_data_config
    cfg = resolve_data_config({}, model=model)
    return DataConfig.of({k: cfg[k] for k in KEYS if k in cfg})


def _hub_reachable(host: str, timeout: float = 3.0) -> bool:
    # huggingface_hub retries for ~45 s with no network; ask the resolver once instead.
    if os.environ.get("CIRCUITLAB_OFFLINE") or os.environ.get("HF_HUB_OFFLINE"):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _torchvision_names() -> list[str]:
    import torchvision
    return list(torchvision.models.list_models(module=torchvision.models))


def _local_archs() -> dict:
    """Architectures defined in circuitlab itself (no hub weights exist for them)."""
    return synthetic.LOCAL_ARCHS


def _create(source: str, arch: str, pretrained: Optional[bool], kwargs: dict) -> nn.Module:
    """Build ``arch``; with pretrained None, try hub weights and fall back to random init."""
    if source == "circuitlab":
        if pretrained:
            raise CircuitlabError(f"{arch} has no pretrained weights; load a checkpoint")
        return _local_archs()[arch](**kwargs)
    if source == "timm":
        import timm

        def build(p):
            return timm.create_model(arch, pretrained=p, **kwargs)
        host = "huggingface.co"
    else:
        import torchvision

        def build(p):
            return torchvision.models.get_model(arch, weights="DEFAULT" if p else None, **kwargs)
        host = "download.pytorch.org"
    if pretrained is False:
        return build(False)
    try:
        if _hub_reachable(host):
            return build(True)
        if source == "timm":  # a copy in the local hub cache still loads offline
            import huggingface_hub.constants as hf_constants
            old, hf_constants.HF_HUB_OFFLINE = hf_constants.HF_HUB_OFFLINE, True
            try:
                return build(True)
            finally:
                hf_constants.HF_HUB_OFFLINE = old
        return build(True)  # torchvision looks in its cache before downloading
    except Exception as e:  # no network, no cached copy, or no pretrained weights exist
        if pretrained:
            raise CircuitlabError(f"could not load pretrained weights for {arch} "
                                  f"({type(e).__name__}); check the network or pass "
                                  f"pretrained=False") from None
        warnings.warn(f"no pretrained weights for {arch} could be loaded ({type(e).__name__}); "
                      f"using a random initialisation. Pass a checkpoint= for real weights.",
                      stacklevel=3)
        return build(False)


def resolve_name(name: str) -> tuple[str, str]:
    """(source, arch) for a model name: 'offline', 'timm' or 'torchvision'."""
    import timm
    if name in OFFLINE_MODELS:
        return "offline", name
    if name in _local_archs():
        return "circuitlab", name
    if "/" in name:
        source, arch = name.split("/", 1)
        if source == "timm" and timm.is_model(arch):
            return "timm", arch
        if source == "torchvision" and arch in _torchvision_names():
            return "torchvision", arch
    elif timm.is_model(name):
        return "timm", name
    elif name in _torchvision_names():
        return "torchvision", name
    # a name both timm and torchvision know (resnet18) is suggested once
    choices = list(dict.fromkeys(list(OFFLINE_MODELS) + list(SYNTHETIC_MODELS) +
                                 list(_local_archs()) + timm.list_models() +
                                 _torchvision_names()))
    raise CircuitlabError(f"unknown model {name!r}.{did_you_mean(name, choices)} "
                          f"`circuitlab models` lists the offline ones; any timm or "
                          f"torchvision classifier name works too")


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
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CircuitlabError(
            f"checkpoint {where} does not fit the architecture: {len(result.missing_keys)} "
            f"missing keys (e.g. {result.missing_keys[:3]}), {len(result.unexpected_keys)} "
            f"unexpected (e.g. {result.unexpected_keys[:3]}); check the model name")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CircuitlabError(f"checkpoint {where} does not fit the architecture: "
                              f"{str(e).splitlines()[-1].strip()[:300]}") from None


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
    any timm name (``resnet50``, ``vit_small_patch16_224``; ``timm/`` prefix optional) or
    torchvision name (``torchvision/resnet18``). ``pretrained=None`` tries hub weights and
    falls back to a random init with a warning; ``checkpoint`` loads a state_dict with
    ``weights_only=True`` (the class count is read from it). Extra keyword arguments go to the
    architecture (``img_size=32``, ``depth=4``, ...).
    """
    meta: dict = {}
    kwargs: dict = {}
    if isinstance(name_or_module, nn.Module):
        model, source, name = name_or_module, "module", type(name_or_module).__name__
        cfg = DataConfig()
    else:
        name = os.fspath(name_or_module)
        if name in SYNTHETIC_MODELS:
            if checkpoint is not None or arch_kwargs or num_classes is not None:
                raise CircuitlabError(f"{name} is the benchmark's own trained model; to load "
                                      f"other weights pass the checkpoint file itself as the "
                                      f"model (load_model('file.pt'), --model file.pt)")
            return _synthetic(name, device)
        if name.endswith((".pt", ".pth")) or Path(name).is_file():
            meta = checkpoints.read(name)
            if checkpoints.kind_of(meta) != "model" or not meta.get("arch"):
                raise CircuitlabError(f"{name!r} is not a circuitlab checkpoint (no arch "
                                      f"recorded); use load_model(ARCH, checkpoint={name!r})")
            checkpoint, name = name, meta["arch"]
            arch_kwargs = {**meta.get("arch_kwargs", {}), **arch_kwargs}
        source, arch = resolve_name(name)
        state = None
        if checkpoint is not None and not meta:
            meta = checkpoints.read(checkpoint)
        if meta:
            state = _state_dict_of(meta)
        if source == "offline" and state is None:
            if num_classes not in (None, 1000) or arch_kwargs:
                raise CircuitlabError(f"{name} ships with fixed ImageNet weights; use "
                                      f"tf_{name} to build a modified architecture")
            model, cfg = _load_offline(name)
        else:
            if source == "offline":
                source, arch = "timm", OFFLINE_MODELS[name].timm_arch
            kwargs = dict(arch_kwargs)
            if num_classes is not None:
                kwargs["num_classes"] = num_classes
            try:
                model = _create(source, arch, False if state is not None else pretrained,
                                kwargs)
                found = _classes_in_state(state, model) if state is not None else None
                if "num_classes" not in kwargs and found not in (None, _num_classes(model)):
                    kwargs["num_classes"] = found  # a fine-tuned head: size it from the file
                    model = _create(source, arch, False, kwargs)
            except TypeError as e:
                raise CircuitlabError(f"{name} does not accept these arguments: {e}") from None
            cfg = _timm_data_config(model) if source == "timm" else DataConfig()
            if "img_size" in kwargs or "in_chans" in kwargs:  # the pretrained cfg lags behind
                size = kwargs.get("img_size", cfg.input_size[1:])
                size = (size, size) if isinstance(size, int) else tuple(size)
                cfg = cfg.replace(input_size=(kwargs.get("in_chans", cfg.input_size[0]), *size))
            if state is not None:
                _load_state(model, state, repr(os.fspath(checkpoint)))
        if meta.get("data_config"):
            cfg = DataConfig.of(meta["data_config"])
        if labels is None and meta.get("labels"):
            labels = meta["labels"]
    if data_config:
        cfg = DataConfig.of({**cfg, **data_config})
    classes = _num_classes(model)
    hm = HookedModel(model, name=name, data_config=cfg, source=source,
                     labels=_labels_for(classes, labels) if classes else labels,
                     arch=name, arch_kwargs=kwargs)
    return _to_device(hm, device)


def _to_device(hm: HookedModel, device) -> HookedModel:
    if device is not None:
        try:
            hm.to(torch.device(device))
        except (RuntimeError, AssertionError) as e:
            raise CircuitlabError(f"cannot use device {device!r}: {e}") from None
    return hm
