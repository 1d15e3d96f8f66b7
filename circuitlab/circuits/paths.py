"""Ingress weights through the modules between two tapped layers.

>>> chain = module_chain(hm.model, "blocks.2", "blocks.4")     # ['blocks.3', 'blocks.4']
>>> w, single = path_weight(hm.model, chain, hm.n_units("blocks.2"))  # (112, 40) on Lite0

When two taps are not joined by one conv, the paper's ||W_{d,s}||_1 has no single W. The
ingress weight through the path is the sum over every path from source unit s to destination
unit d of the product of the absolute weights along it: a conv or linear layer contributes
||W_{d,s}||_1 over its kernel (grouped and depthwise convs block-diagonal), BatchNorm its scale
|gamma| / sqrt(var + eps) (without it the scale of a conv before BatchNorm is arbitrary), a
residual add the sum of its branches (the identity for a skip), and channel-wise modules
(activations, pooling, dropout, Identity) pass units through. It is a property of the weights
alone, the static counterpart of ``edges="effective"`` (gradient x activation on this
image), and costs a few small matrix products instead of a backward per destination unit.

Blocks are read by tracing them with torch.fx; anything the composition does not understand
(a squeeze-excite gate multiplying two activations, attention, reshapes that mix units)
returns None and the readout falls back to effective edges.
"""
from __future__ import annotations

import operator
import weakref
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..hook_points import is_channelwise
from .edges import weight_l1

# functional forms of the channel-wise modules (hook_points.is_channelwise)
_CHANNELWISE_FNS = {F.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.leaky_relu, F.elu,
                    torch.relu, torch.sigmoid, torch.tanh, F.adaptive_avg_pool2d,
                    F.adaptive_max_pool2d, F.max_pool2d, F.avg_pool2d, F.dropout,
                    torch.flatten}
_CHANNELWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "flatten", "contiguous", "clone"}
_ADD = {operator.add, operator.iadd, torch.add}


def _is_weight(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))


class _Tracer(fx.Tracer):
    """Stops at weights, norms and channel-wise modules; traces through everything else."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (_is_weight(m) or isinstance(m, nn.modules.batchnorm._BatchNorm)
                or is_channelwise(m) or super().is_leaf_module(m, qualname))


# traced graphs by module: the structure is fixed, the weights are read at each call (so a
# re-drawn or fine-tuned model composes its new weights); tracing is most of the cost
_GRAPHS: "weakref.WeakKeyDictionary[nn.Module, Optional[fx.Graph]]" = weakref.WeakKeyDictionary()


def _graph(module: nn.Module) -> Optional[fx.Graph]:
    if module not in _GRAPHS:
        try:
            _GRAPHS[module] = _Tracer().trace(module)
        except Exception:   # noqa: BLE001 -- a module fx cannot trace is simply not composed
            _GRAPHS[module] = None
    return _GRAPHS[module]


def _leaf_graph() -> fx.Graph:
    g = fx.Graph()
    g.output(g.call_module("m", (g.placeholder("x"),)))
    return g


_LEAF = _leaf_graph()


def _device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _bn_scale(m: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    scale = torch.ones_like(m.running_var) if m.weight is None else m.weight.detach().abs()
    return scale / (m.running_var + m.eps).sqrt()


def _compose(module: nn.Module, n_in: int) -> Optional[tuple]:
    """(|path weight| (out units, n_in) or None for the identity, weight layers, residual
    adds) of one module, or None where it cannot be composed."""
    if is_channelwise(module):
        return None, 0, 0
    if _is_weight(module) or isinstance(module, nn.modules.batchnorm._BatchNorm):
        graph = _LEAF                      # fx would not trace into a leaf at the root
        mods = {"m": module}
    else:
        graph = _graph(module)
        mods = dict(module.named_modules())
    if graph is None:
        return None
    mats: dict = {}
    n_weights = n_adds = placeholders = 0
    for node in graph.nodes:
        if node.op == "placeholder":
            placeholders += 1
            if placeholders > 1:
                return None
            mats[node] = None              # the identity on the input's units
            continue
        if node.op == "output":
            arg = node.args[0]
            return (mats[arg], n_weights, n_adds) if isinstance(arg, fx.Node) else None
        if node.op == "call_module":
            src = node.args[0] if node.args else None
            if not isinstance(src, fx.Node) or src not in mats:
                return None
            mat, weights, adds = _through_module(mods[node.target], mats[src])
        elif node.op in ("call_function", "call_method"):
            args = [a for a in node.args if isinstance(a, fx.Node)]
            if any(a not in mats for a in args) or not args:
                return None
            mat, weights, adds = _through_function(node.target, [mats[a] for a in args], n_in,
                                                   module)
        else:
            return None
        if mat is _NOT:
            return None
        mats[node], n_weights, n_adds = mat, n_weights + weights, n_adds + adds
    return None


_NOT = object()          # a step the path weight cannot be composed through


def _through_module(m: nn.Module, a: Optional[torch.Tensor]) -> tuple:
    """(the path weight after module ``m`` given ``a`` before it (None: the identity) or
    _NOT, weight layers, residual adds)."""
    if _is_weight(m):
        w = weight_l1(m)
        return (w if a is None else w @ a), 1, 0
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        s = _bn_scale(m)
        return (torch.diag(s) if a is None else s[:, None] * a), 0, 0
    if is_channelwise(m):
        return a, 0, 0
    return _NOT, 0, 0


def _through_function(fn, mats: list, n_in: int, module: nn.Module) -> tuple:
    """(the path weight after function ``fn`` of the nodes' weights ``mats`` or _NOT,
    weight layers, residual adds): sums and channelwise functions only."""
    if fn in _ADD or fn in ("add", "add_", "__add__"):
        if len(mats) == 1:                 # plus a constant
            return mats[0], 0, 0
        if len(mats) != 2:
            return _NOT, 0, 0
        a, b = (m if m is not None else torch.eye(n_in, device=_device(module)) for m in mats)
        return (a + b, 0, 1) if a.shape == b.shape else (_NOT, 0, 0)
    if fn in _CHANNELWISE_FNS or fn in _CHANNELWISE_METHODS:
        return (mats[0], 0, 0) if len(mats) == 1 else (_NOT, 0, 0)
    return _NOT, 0, 0                      # gates, attention, reshapes: not composed


def module_chain(model: nn.Module, src: str, dst: Optional[str],
                 stop_before: Optional[str] = None) -> Optional[list[str]]:
    """Paths of the modules that run between module ``src`` and module ``dst`` (inclusive), or
    up to ``stop_before`` (exclusive: the classifier, for the pooled features): the siblings
    after ``src`` in registration order, climbing to the parent when a level runs out and
    descending into the module that holds the destination.

    A guess from the module tree (a custom forward may call its children in any order):
    ``verify`` checks it against a run."""
    target = dst if dst is not None else stop_before
    if target is None or target == src or target.startswith(src + "."):
        return None             # the destination inside the source: no forward path

    def children(path):
        mod = model.get_submodule(path) if path else model
        return [f"{path}.{n}" if path else n for n, _ in mod.named_children()]

    def down(kids, chain):
        for k in kids:
            if k == target:
                return chain + [k] if dst is not None else chain
            if target.startswith(k + "."):
                return down(children(k), chain)
            chain = chain + [k]
        return None

    chain, cur = [], src
    while cur:
        parent = cur.rpartition(".")[0]
        kids = children(parent)
        if cur not in kids:
            return None
        rest = kids[kids.index(cur) + 1:]
        if any(k == target or target.startswith(k + ".") for k in rest):
            return down(rest, chain)
        chain += rest
        if parent == dst:            # the destination holds the source: the rest of it
            return chain or None
        cur = parent
    return None


def chain_hooks(chain: Sequence[str]) -> list[str]:
    """Hook names whose values ``verify`` compares: each module's input and output."""
    return [n for m in chain for n in (f"{m}.hook_in", m)]


def verify(cache, src: str, chain: Sequence[str], dst: str) -> bool:
    """True when on this run each module of ``chain`` read exactly what the one before it
    produced, the first read ``src``'s output and the last produced ``dst``."""
    def same(a, b):
        return a.numel() == b.numel() and torch.equal(a.reshape(a.shape[0], -1),
                                                      b.reshape(b.shape[0], -1))
    prev = cache[src]
    for m in chain:
        if not same(cache[f"{m}.hook_in"], prev):
            return False
        prev = cache[m]
    return same(prev, cache[dst])


def path_weight(model: nn.Module, chain: Sequence[str],
                n_in: int) -> Optional[tuple[torch.Tensor, Optional[nn.Module]]]:
    """(ingress weights (out units, ``n_in``), single) through ``chain``, or None where a
    module cannot be composed. ``single``: the conv or
    linear layer when it is the only one on the path (followed only by norms and channel-wise
    modules), whose raw ||W||_1 is the paper's edge weight; else None."""
    total, n_weights, n_adds = None, 0, 0
    for path in chain:
        got = _compose(model.get_submodule(path), n_in if total is None else total.shape[0])
        if got is None:
            return None
        w, n, a = got
        n_weights, n_adds = n_weights + n, n_adds + a
        if w is not None:
            total = w if total is None else w @ total
    if total is None:                # channel-wise modules only (a pool): the identity
        total = torch.eye(n_in, device=_device(model))
    if total.shape[1] != n_in:
        return None
    if n_weights != 1 or n_adds:
        return total, None
    single = next(m for path in chain for m in model.get_submodule(path).modules()
                  if _is_weight(m))
    return total, single
