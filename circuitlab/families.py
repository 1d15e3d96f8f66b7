"""Per-family knowledge: which module is the classifier, which layers are "the" layers to tap.

Later stages (activation matching, circuit readout) ask a model for its taps and its classifier
instead of hard-coding module paths. Timm models describe their feature layers uniformly in
``model.feature_info``; torchvision and user models fall back to rules on the probed forward.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .hook_points import HookPoint

# class-name fragments -> family name, first match wins
_FAMILY_BY_CLASS = (
    ("visiontransformer", "vit"), ("vit", "vit"), ("deit", "vit"),
    ("convnext", "convnext"),
    ("mobilenet", "mobilenet"),
    ("efficientnet", "efficientnet"),
    ("resnet", "resnet"),
    ("vgg", "vgg"),
)
# families whose units are tokens: attention heads and MLP neurons, a CLS token to attend
# from, cosine distances on every tap; what callers ask of a family, declared once
TRANSFORMERS = frozenset({"vit"})


@dataclass(frozen=True)
class Family:
    """What circuitlab knows about a model's architecture."""

    name: str                  # resnet, efficientnet, mobilenet, convnext, vgg, vit, generic
    classifier: str            # module path of the layer producing the logits
    taps: tuple[str, ...]      # default tap hook names, shallow to deep
    blocks: tuple[str, ...]    # residual / inverted-residual / transformer blocks

    @property
    def transformer(self) -> bool:
        """Token features (heads, neurons, CLS attention), not channel maps."""
        return self.name in TRANSFORMERS


def family_name(model: nn.Module) -> str:
    cls = type(model).__name__.lower()
    for fragment, name in _FAMILY_BY_CLASS:
        if fragment in cls:
            return name
    return "generic"


def _classifier(model: nn.Module, points: list[HookPoint]) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    head = cfg.get("classifier")
    if isinstance(head, (tuple, list)):
        head = head[0]  # distilled DeiT: the class head, not the distillation head
    modules = dict(model.named_modules())
    if head in modules and isinstance(modules[head], nn.Linear):
        return head
    if head in modules and isinstance(getattr(modules[head], "fc", None), nn.Linear):
        return head + ".fc"
    # The last linear layer to run whose output has the shape of the logits.
    outs = [p for p in points if p.io == "output" and p.alias_of is None and p.call == 0]
    logits_shape = outs[-1].shape if outs else None
    for p in reversed(outs):
        if isinstance(modules[p.module], (nn.Linear, nn.modules.conv._ConvNd)) and (
                p.shape[-1] == logits_shape[-1] if logits_shape else True):
            return p.module
    return ""


def _vit_taps(blocks: list[str]) -> list[str]:
    # The paper's ViT-B/16 taps are blocks 3, 7, 11 of 12: thirds of the depth.
    d = len(blocks)
    idx = sorted({max(0, round(d * k / 3) - 1) for k in (1, 2, 3)})
    return [blocks[i] for i in idx]


def _resolution_taps(points: list[HookPoint]) -> list[str]:
    """Last shallowest module output at each spatial resolution: stem, then each stage."""
    best: dict[tuple, HookPoint] = {}
    for p in points:
        if p.io != "output" or p.alias_of or p.call or len(p.shape) != 4 or p.unit_axis != 1:
            continue
        if p.shape[2] * p.shape[3] == 1:  # globally pooled features are no map to tap
            continue
        key = p.shape[2:]
        cur = best.get(key)
        depth = p.module.count(".")
        if cur is None or depth <= cur.module.count("."):
            best[key] = p
    return [p.name for p in sorted(best.values(), key=lambda p: p.order)]


def detect_family(model: nn.Module, points: list[HookPoint]) -> Family:
    name = family_name(model)
    names = {p.name for p in points}
    # Outermost blocks only: an SE module inside an MBConv block is not a block of its own.
    found = [p.module for p in points
             if p.kind == "block" and p.io == "output" and p.call == 0 and not p.alias_of]
    blocks = tuple(b for b in found if not any(b.startswith(o + ".") for o in found))

    taps: list[str] = []
    info = getattr(model, "feature_info", None)
    if name in TRANSFORMERS:
        taps = _vit_taps(list(blocks))
    elif info is not None:
        try:
            taps = [f["module"] for f in info]
        except (TypeError, KeyError):
            taps = []
        taps = [t for t in taps if t in names]
    if not taps and name == "resnet":
        taps = [t for t in ("relu", "layer1", "layer2", "layer3", "layer4") if t in names]
    if not taps and name == "vgg":
        taps = [p.name for p in points if p.kind == "pool" and p.module.startswith("features.")
                and not p.alias_of and p.io == "output"]
    if not taps:
        taps = _resolution_taps(points)
    return Family(name=name, classifier=_classifier(model, points), taps=tuple(taps),
                  blocks=blocks)
