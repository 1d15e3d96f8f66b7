"""Per-family knowledge: which module is the classifier, which layers are "the" layers to tap.

Later stages (activation matching, circuit readout) ask a model for its taps and its classifier
instead of hard-coding module paths. Timm models describe their feature layers uniformly in
``model.feature_info``; torchvision and user models fall back to rules on the probed forward.
Each family is declared once in ``FAMILIES`` (how it is recognised, its capabilities, its tap
rules); callers ask ``hm.family.transformer``, never the family's name.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .hook_points import HookPoint


@dataclass(frozen=True)
class Family:
    """What circuitlab knows about a model's architecture."""

    name: str                  # resnet, efficientnet, mobilenet, convnext, vgg, vit, generic
    classifier: str            # module path of the layer producing the logits
    taps: tuple[str, ...]      # default tap hook names, shallow to deep
    blocks: tuple[str, ...]    # residual / inverted-residual / transformer blocks
    transformer: bool = False  # token features (heads, neurons, CLS attention), not channel maps


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


# ---------------------------------------------------------------------------- tap rules
# A rule: (model, hook points, outermost blocks) -> tap names, empty where it does not apply.
def _block_thirds(model, points, blocks) -> list[str]:
    # The paper's ViT-B/16 taps are blocks 3, 7, 11 of 12: thirds of the depth.
    d = len(blocks)
    idx = sorted({max(0, round(d * k / 3) - 1) for k in (1, 2, 3)})
    return [blocks[i] for i in idx] if d else []


def _feature_info(model, points, blocks) -> list[str]:
    """timm's declared feature layers."""
    info = getattr(model, "feature_info", None)
    try:
        taps = [f["module"] for f in info] if info is not None else []
    except (TypeError, KeyError):
        return []
    names = {p.name for p in points}
    return [t for t in taps if t in names]


def _named(*taps: str):
    def rule(model, points, blocks) -> list[str]:
        names = {p.name for p in points}
        return [t for t in taps if t in names]
    return rule


def _feature_pools(model, points, blocks) -> list[str]:
    return [p.name for p in points if p.kind == "pool" and p.module.startswith("features.")
            and not p.alias_of and p.io == "output"]


def _resolution_taps(model, points, blocks) -> list[str]:
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


# ---------------------------------------------------------------------------- the families
@dataclass(frozen=True)
class FamilySpec:
    """A declared family: how to recognise it, what it can do, where its taps are."""

    name: str
    fragments: tuple[str, ...]           # lower-case class-name fragments that identify it
    transformer: bool = False            # units are tokens: heads, neurons, a CLS token
    tap_rules: tuple = (_feature_info,)  # tried in order; the first non-empty answer wins


# first match wins; anything unmatched is ``generic``
FAMILIES = (
    FamilySpec("vit", ("visiontransformer", "vit", "deit"), transformer=True,
               tap_rules=(_block_thirds,)),
    FamilySpec("convnext", ("convnext",)),
    FamilySpec("mobilenet", ("mobilenet",)),
    FamilySpec("efficientnet", ("efficientnet",)),
    FamilySpec("resnet", ("resnet",),
               tap_rules=(_feature_info, _named("relu", "layer1", "layer2", "layer3", "layer4"))),
    FamilySpec("vgg", ("vgg",), tap_rules=(_feature_info, _feature_pools)),
)
GENERIC = FamilySpec("generic", ())


def family_of(model: nn.Module) -> FamilySpec:
    cls = type(model).__name__.lower()
    return next((f for f in FAMILIES if any(frag in cls for frag in f.fragments)), GENERIC)


def detect_family(model: nn.Module, points: list[HookPoint]) -> Family:
    spec = family_of(model)
    # Outermost blocks only: an SE module inside an MBConv block is not a block of its own.
    found = [p.module for p in points
             if p.kind == "block" and p.io == "output" and p.call == 0 and not p.alias_of]
    blocks = tuple(b for b in found if not any(b.startswith(o + ".") for o in found))
    taps: list[str] = []
    for rule in (*spec.tap_rules, _resolution_taps):
        taps = rule(model, points, blocks)
        if taps:
            break
    return Family(name=spec.name, classifier=_classifier(model, points), taps=tuple(taps),
                  blocks=blocks, transformer=spec.transformer)
