"""Eval-mode BatchNorm folded into the convolution that feeds it, in a copy of a model.

In eval mode a BatchNorm is an affine map per channel, so ``bn(conv(x))`` is one convolution
with scaled weights and a shifted bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``). Eager
PyTorch does not fuse it: on a CPU the norms are a large share of a small CNN's forward
(EfficientNet-Lite0: docs/results.md, "Superpixel regions"), which a search of thousands of
forwards pays each time.

A pair is folded only where the norm's input *is* the convolution's output in a forward of
an example (each run once), and only for the norm types declared in ``_TAILS`` (what is
left of the norm once its affine map is in the convolution). The copy's logits are checked
against the model's on the example; where they differ, nothing is folded.
"""
from __future__ import annotations

import copy

import torch
from timm.layers import BatchNormAct2d
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


class _Tail(nn.Module):
    """What a timm ``BatchNormAct2d`` does after its norm: dropout, then the activation (the
    names kept, so the hook points under the norm keep theirs)."""

    def __init__(self, norm: BatchNormAct2d):
        super().__init__()
        self.drop, self.act = norm.drop, norm.act

    def forward(self, x):
        return self.act(self.drop(x))


# the norm types folded (exact types: a subclass may do more), and what replaces each
_TAILS = {nn.BatchNorm2d: lambda norm: nn.Identity(), BatchNormAct2d: _Tail}


def _pairs(model: nn.Module, example: torch.Tensor) -> list:
    """(convolution path, norm path) where the norm's input is the convolution's output in
    one forward of ``example``, each module run once."""
    convs = {m: p for p, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    norms = {m: p for p, m in model.named_modules()
             if type(m) in _TAILS and not m.training and m.running_var is not None}
    outputs, inputs, runs = {}, {}, {}

    def after_conv(mod, args, out):
        runs[mod] = runs.get(mod, 0) + 1
        outputs[mod] = out

    def before_norm(mod, args):
        runs[mod] = runs.get(mod, 0) + 1
        inputs[mod] = args[0]

    handles = [m.register_forward_hook(after_conv) for m in convs] + \
        [m.register_forward_pre_hook(before_norm) for m in norms]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    fed = {id(out): conv for conv, out in outputs.items()}
    return [(convs[fed[id(t)]], norms[norm]) for norm, t in inputs.items()
            if id(t) in fed and outputs[fed[id(t)]] is t
            and runs[norm] == 1 and runs[fed[id(t)]] == 1]


def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, list]:
    """(a copy of ``model`` with each eval-mode BatchNorm folded into the convolution that
    feeds it, the (convolution, norm) paths folded); ``(model, [])`` where none is, or where the copy's
    logits on ``example`` differ from the model's beyond float rounding. The copy reads the
    weights as they are now; its convolutions' outputs (and the norms' inputs) are the
    folded ones, every other module's output the model's."""
    pairs = _pairs(model, example)
    if not pairs:
        return model, []
    folded = copy.deepcopy(model)
    for conv_path, norm_path in pairs:
        norm = folded.get_submodule(norm_path)
        _replace(folded, conv_path, fuse_conv_bn_eval(folded.get_submodule(conv_path), norm))
        _replace(folded, norm_path, _TAILS[type(norm)](norm))
    with torch.no_grad():
        want, got = model(example), folded(example)
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max())):
        return model, []
    return folded, pairs


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)
