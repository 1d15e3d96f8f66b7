"""Hook points: every place in a forward pass that can be read or replaced, named and ordered.

A hook point is a module's output (or input) at one of its calls. Its name is the module's dotted
path (``layer3.1.conv2``); a module called several times in one forward also gets ``path@k`` for
call ``k >= 1`` (torchvision ResNets reuse one ``relu`` per block). Timm-style transformer blocks
get TransformerLens-style aliases (``blocks.3.hook_resid_pre``, ``blocks.3.attn.hook_pattern``,...)
that point at the module input or output holding the same tensor, so an alias costs nothing.

One probe forward on a dummy input records, for each hook point, its shape, its position in the
forward order (nnsight requires interventions in that order) and the axis that holds its units
(channels of a conv map, heads of an attention pattern, neurons of an MLP).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
from torch import nn

from .errors import CircuitlabError

KINDS = ("conv", "norm", "act", "pool", "linear", "block", "stage", "attn", "mlp", "embed",
         "resid", "classifier", "other")


@dataclass(frozen=True)
class HookPoint:
    """One readable and replaceable activation of a model."""

    name: str
    module: str                  # dotted module path; '' is the whole model
    io: str                      # 'output' or 'input' (first positional input)
    call: int                    # which call of the module in one forward (0 = first)
    kind: str
    shape: tuple                 # at the probe input, batch of 1
    unit_axis: Optional[int]     # axis of the units (channel / head / neuron), None if none
    order: int                   # position in the forward pass; interventions run in this order
    alias_of: Optional[str] = None
    # For aliases that reshape (per-head ``hook_z``): module tensor -> public view, and back.
    view: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    unview: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    # Attention module whose fused kernel must be off for this point to exist (``hook_pattern``).
    needs_unfused: Optional[str] = None

    @property
    def n_units(self) -> Optional[int]:
        return None if self.unit_axis is None else self.shape[self.unit_axis]

    def per_unit(self, t: torch.Tensor) -> torch.Tensor:
        """(B, U, rest) view of an activation of this point, its units on axis 1."""
        if self.unit_axis is None:
            raise CircuitlabError(f"hook point {self.name!r} has no unit axis")
        return units_first(t, self.unit_axis)


def units_first(t: torch.Tensor, axis: int) -> torch.Tensor:
    """(B, U, rest) view of an activation whose units lie on ``axis``."""
    t = t.movedim(axis, 1)
    return t[..., None] if t.dim() == 2 else t.flatten(2)


# The module taxonomy, declared once: hook-point kinds here, path composition in
# circuits/paths.py. Elementwise activations map channel c to channel c; softmax does not.
ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid,
               nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Mish, nn.PReLU)
_ACTIVATIONS = ELEMENTWISE + (nn.Softmax,)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
          nn.modules.instancenorm._InstanceNorm)
POOLS = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
         nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)
# regularisers and reshapes that leave each channel where it is
PASS_THROUGH = (nn.Identity, nn.modules.dropout._DropoutNd, nn.Flatten)
_PASS_THROUGH_NAMES = {"droppath", "selectadaptivepool2d", "blurpool2d"}
# where a module's output keeps its units: axis 1 (conv maps) or the last axis (tokens)
_CHANNEL_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                  nn.modules.instancenorm._InstanceNorm) + POOLS
_CHANNEL_LAST = (nn.Linear, nn.LayerNorm, nn.Embedding)
_ACTIVATION_NAMES = {"relu", "relu6", "gelu", "gelutanh", "quickgelu", "silu", "swish", "mish",
                     "hardswish", "hardsigmoid", "hardswishme", "sigmoid", "tanh", "gelu_tanh"}
_BLOCK_WORDS = ("block", "bottleneck", "invertedresidual", "depthwiseseparable", "mbconv",
                "encoderblock", "cnblock", "residual")


def is_channelwise(module: nn.Module) -> bool:
    """The module maps channel c to channel c (an elementwise activation, a pool, a
    regulariser or reshape): a path of weights passes its units straight through."""
    cls = type(module).__name__.lower()
    return (isinstance(module, ELEMENTWISE + POOLS + PASS_THROUGH)
            or cls in _ACTIVATION_NAMES or cls in _PASS_THROUGH_NAMES)


def module_kind(module: nn.Module) -> str:
    """A coarse kind from the module's type, the same across timm and torchvision."""
    cls = type(module).__name__.lower()
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, _NORMS) or cls.endswith("norm") or "norm2d" in cls or "normact" in cls:
        return "norm"
    if isinstance(module, _ACTIVATIONS) or cls in _ACTIVATION_NAMES:
        return "act"
    if isinstance(module, POOLS) or "pool" in cls:
        return "pool"
    if isinstance(module, nn.Linear):
        return "linear"
    if "attention" in cls or isinstance(module, nn.MultiheadAttention):
        return "attn"
    if cls in ("mlp", "glumlp", "swiglu", "mlpblock"):
        return "mlp"
    if "patchembed" in cls or isinstance(module, nn.Embedding):
        return "embed"
    if any(w in cls for w in _BLOCK_WORDS):
        return "block"
    if "stage" in cls:
        return "stage"
    if isinstance(module, (nn.Sequential, nn.ModuleList)) and len(module) and all(
            module_kind(c) == "block" for c in module.children()):
        return "stage"
    return "other"


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _probe_unit_axis(module: nn.Module, out: torch.Tensor, in_axis: Optional[int],
                     recent_axis: dict) -> Optional[int]:
    nd = out.dim()
    if nd <= 1:
        return None
    if nd == 2:
        return 1
    if isinstance(module, _CHANNEL_FIRST) or "norm2d" in type(module).__name__.lower():
        return 1
    if isinstance(module, _CHANNEL_LAST) or "attention" in type(module).__name__.lower():
        return nd - 1
    dims = getattr(module, "dims", None)  # torchvision's Permute module moves the unit axis
    if type(module).__name__ == "Permute" and dims is not None and in_axis is not None:
        return list(dims).index(in_axis)
    # Activations, dropouts and containers keep the axis of the latest tensor of this shape.
    if tuple(out.shape) in recent_axis:
        return recent_axis[tuple(out.shape)]
    return 1 if nd == 4 else nd - 1


@torch.no_grad()
def probe(model: nn.Module, example: torch.Tensor) -> list[HookPoint]:
    """Run ``model`` once on ``example`` and return every module-level hook point in forward order."""
    events: list[tuple] = []           # (path, io, call, shape, axis)
    calls: dict[str, int] = {}
    in_axes: dict[int, Optional[int]] = {}  # id(module) -> unit axis of its current input
    recent_axis: dict[tuple, int] = {}
    paths = {m: p for p, m in model.named_modules() if p}

    def pre(mod, args):
        path = paths[mod]
        t = _first_tensor(args)
        shape = tuple(t.shape) if t is not None else None
        axis = recent_axis.get(shape) if shape is not None else None
        in_axes[id(mod)] = axis
        events.append((path, "input", calls.get(path, 0), shape, axis))

    def post(mod, args, out):
        path = paths[mod]
        call = calls.get(path, 0)
        calls[path] = call + 1
        if isinstance(out, torch.Tensor):
            axis = _probe_unit_axis(mod, out, in_axes.get(id(mod)), recent_axis)
            if axis is not None:
                recent_axis[tuple(out.shape)] = axis
            events.append((path, "output", call, tuple(out.shape), axis))

    handles = []
    for mod in paths:
        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post))
    try:
        model(example)
    finally:
        for h in handles:
            h.remove()

    modules = dict(model.named_modules())
    points = []
    for order, (path, io, call, shape, axis) in enumerate(events):
        if shape is None:
            continue
        if io == "output":
            name = path if call == 0 else f"{path}@{call}"
        else:
            # Inputs are reachable under explicit names only, to keep the list readable.
            name = f"{path}.hook_in" if call == 0 else f"{path}.hook_in@{call}"
        parent = path.rsplit(".", 1)[0]
        # timm attention calls attn_drop (the probabilities) only on its unfused path
        unfused = parent if path.endswith(".attn_drop") and hasattr(
            modules[parent], "fused_attn") else None
        points.append(HookPoint(name=name, module=path, io=io, call=call,
                                kind=module_kind(modules[path]), shape=shape, unit_axis=axis,
                                order=order, needs_unfused=unfused))
    return points


def classifier_aliases(points: list[HookPoint], classifier: str) -> list[HookPoint]:
    """``hook_pooled`` (the classifier's input features) and ``hook_logits`` (its output)."""
    by_key = {(p.module, p.io, p.call): p for p in points}
    out = []
    for alias, io in (("hook_pooled", "input"), ("hook_logits", "output")):
        src = by_key.get((classifier, io, 0))
        if src is not None:
            out.append(replace(src, name=alias, alias_of=src.name, kind="classifier",
                               unit_axis=len(src.shape) - 1))
    return out


# --------------------------------------------------------------------------------------------
# TransformerLens-style aliases for timm-style transformer blocks.

def _is_timm_block(module: nn.Module) -> bool:
    attn, mlp = getattr(module, "attn", None), getattr(module, "mlp", None)
    return (attn is not None and mlp is not None and hasattr(attn, "num_heads")
            and hasattr(attn, "proj") and hasattr(module, "norm2") and hasattr(mlp, "fc1"))


def _heads_view(num_heads: int):
    def view(t):
        return t.unflatten(-1, (num_heads, t.shape[-1] // num_heads))

    def unview(t):
        return t.flatten(-2)
    return view, unview


def transformer_aliases(model: nn.Module, points: list[HookPoint]) -> list[HookPoint]:
    """Alias hook points for every timm-style block (``blocks.{i}`` in ViT / DeiT / ...).

    ========================== ============================================ ==================
    alias                      tensor                                       units
    ========================== ============================================ ==================
    ``hook_resid_pre``         block input (residual stream)                d_model (last)
    ``hook_resid_mid``         residual stream after attention (norm2 input) d_model
    ``hook_resid_post``        block output                                 d_model
    ``hook_attn_out``          attention branch output (ls1)                d_model
    ``hook_mlp_out``           MLP branch output (ls2)                      d_model
    ``attn.hook_pattern``      attention probabilities (B, heads, q, k)     heads (axis 1)
    ``attn.hook_z``            per-head outputs before ``proj`` (B, N, H, D)  heads (axis 2)
    ``mlp.hook_pre``           MLP pre-activation (fc1 output)              neurons (last)
    ``mlp.hook_post``          MLP neurons after the nonlinearity           neurons (last)
    ========================== ============================================ ==================
    """
    by_key = {(p.module, p.io, p.call): p for p in points}
    aliases = []

    def add(alias, module, io, kind, axis=None, view=None, unview=None, shape=None):
        src = by_key.get((module, io, 0))
        if src is None:
            return
        aliases.append(replace(src, name=alias, kind=kind, alias_of=src.name,
                               unit_axis=src.unit_axis if axis is None else axis,
                               shape=src.shape if shape is None else shape,
                               view=view, unview=unview))

    for path, block in model.named_modules():
        if not path or not _is_timm_block(block):
            continue
        p = path + "."
        add(p + "hook_resid_pre", path, "input", "resid")
        add(p + "hook_resid_mid", p + "norm2", "input", "resid")
        add(p + "hook_resid_post", path, "output", "resid")
        add(p + "hook_attn_out", p + "ls1" if hasattr(block, "ls1") else p + "attn", "output",
            "attn")
        add(p + "hook_mlp_out", p + "ls2" if hasattr(block, "ls2") else p + "mlp", "output", "mlp")
        attn = block.attn
        if hasattr(attn, "attn_drop") and hasattr(attn, "fused_attn"):
            add(p + "attn.hook_pattern", p + "attn.attn_drop", "output", "attn", axis=1)
        src = by_key.get((p + "attn.proj", "input", 0))
        if src is not None:
            view, unview = _heads_view(attn.num_heads)
            shape = src.shape[:-1] + (attn.num_heads, src.shape[-1] // attn.num_heads)
            add(p + "attn.hook_z", p + "attn.proj", "input", "attn", axis=len(shape) - 2,
                view=view, unview=unview, shape=shape)
        add(p + "mlp.hook_pre", p + "mlp.fc1", "output", "mlp")
        add(p + "mlp.hook_post", p + "mlp.act", "output", "mlp")
    return aliases
