"""Heads and MLP neurons of timm-style transformer blocks as circuit nodes, joined through the
residual stream by virtual weights (Elhage et al. 2021, "A Mathematical Framework for
Transformer Circuits").

A head h of block i writes to the residual stream through its slice of the output projection,
W_out(h) = diag(ls1) proj.W[:, h D:(h+1) D] (d_model x d_head); an MLP neuron j through
W_out(j) = diag(ls2) fc2.W[:, j]. A later unit reads the stream through its input weights
after the block's LayerNorm scale: a head through its query, key and value rows of qkv,
W_in(h') = qkv.W[rows of h'] diag(norm1.weight) (3 d_head x d_model); a neuron through
W_in(j') = fc1.W[j'] diag(norm2.weight). The edge weight is the L1 norm of the virtual weight
W_in(d) W_out(s), the direct path through the stream (the LayerNorm's per-token 1/sigma and
the blocks in between are left out); the score multiplies it by the source's energy, as for
convolutions. Sources precede destinations in the forward pass.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import CircuitlabError

HEADS, NEURONS = "attn.hook_z", "mlp.hook_post"


def component_of(layer: str):
    """(block path, 'head' | 'neuron') for a component hook name, else None."""
    for suffix, kind in ((HEADS, "head"), (NEURONS, "neuron")):
        if layer.endswith("." + suffix):
            return layer[:-len(suffix) - 1], kind
    return None


def component_layers(hook_points, blocks: Sequence[str]) -> list[str]:
    """Head and neuron hook names of each block that has them, in forward order."""
    out = []
    for b in blocks:
        out += [n for n in (f"{b}.{HEADS}", f"{b}.{NEURONS}") if n in hook_points]
    return out


def _gamma(block: nn.Module, name: str, n: int, ref: torch.Tensor) -> torch.Tensor:
    mod = getattr(block, name, None)
    g = getattr(mod, "gamma", None) if mod is not None else None
    if g is None:
        g = getattr(mod, "weight", None) if isinstance(mod, nn.LayerNorm) else None
    return g.detach().float() if g is not None else ref.new_ones(n)


def _parts(model: nn.Module, layer: str):
    found = component_of(layer)
    if found is None:
        raise CircuitlabError(f"{layer!r} is not a head ({HEADS}) or neuron ({NEURONS}) layer")
    path, kind = found
    block = model.get_submodule(path)
    try:
        if kind == "head":
            attn = block.attn
            return block, kind, attn.qkv.weight.detach().float(), \
                attn.proj.weight.detach().float(), attn.num_heads
        return block, kind, block.mlp.fc1.weight.detach().float(), \
            block.mlp.fc2.weight.detach().float(), None
    except AttributeError as e:
        raise CircuitlabError(f"block {path!r} is not a timm-style block (attn.qkv/proj, "
                              f"mlp.fc1/fc2): {e}; use edges='effective'") from None


def write_weights(model: nn.Module, layer: str, units: Sequence[int]) -> torch.Tensor:
    """(units, d_model, r): how each unit writes to the residual stream."""
    block, kind, _, w_out, heads = _parts(model, layer)
    d_model = w_out.shape[0]
    if kind == "head":
        dh = w_out.shape[1] // heads
        ws = torch.stack([w_out[:, h * dh:(h + 1) * dh] for h in units])
        return ws * _gamma(block, "ls1", d_model, w_out)[None, :, None]
    ws = w_out[:, list(units)].T[:, :, None]
    return ws * _gamma(block, "ls2", d_model, w_out)[None, :, None]


def read_weights(model: nn.Module, layer: str, units: Sequence[int]) -> torch.Tensor:
    """(units, r, d_model): how each unit reads the (normalised) residual stream."""
    block, kind, w_in, _, heads = _parts(model, layer)
    d_model = w_in.shape[1]
    if kind == "head":
        dh = d_model // heads
        rows = [torch.cat([w_in[q * d_model + h * dh: q * d_model + (h + 1) * dh]
                           for q in range(3)]) for h in units]
        return torch.stack(rows) * _gamma(block, "norm1", d_model, w_in)[None, None, :]
    return w_in[list(units)][:, None, :] * _gamma(block, "norm2", d_model, w_in)[None, None, :]


def virtual_l1(model: nn.Module, src: str, dst: str, src_units: Sequence[int],
               dst_units: Sequence[int]) -> torch.Tensor:
    """(len(dst), len(src)): ||W_in(d) W_out(s)||_1 for each pair."""
    w_out = write_weights(model, src, src_units)                 # (S, d, r_s)
    w_in = read_weights(model, dst, dst_units)                   # (D, r_d, d)
    v = torch.einsum("arm,bmc->abrc", w_in, w_out)               # (D, S, r_d, r_s)
    return v.abs().sum((-1, -2))
