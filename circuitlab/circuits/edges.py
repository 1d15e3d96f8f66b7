"""Edge weights between units of two layers.

- ``weight_l1``: ||W_{d,s}||_1 over the kernel, as a dense (dst units, src units) matrix, for
  standard, grouped and depthwise convolutions (block-diagonal) and linear layers.
- ``effective_edges``: for layers that are not joined by one conv or linear layer (residual
  blocks, inverted residuals, attention), the linearised contribution of each source unit to
  each destination unit's total activation, |sum_pos dD_d/dA_s * A_s| (gradient x activation
  from the destination back to the source), computed for all chosen destinations in one
  batched backward.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..errors import CircuitlabError


def weight_l1(module: nn.Module) -> torch.Tensor:
    """(out units, in units) matrix of ||W_{d,s}||_1 (summed over the kernel)."""
    if isinstance(module, nn.Linear):
        return module.weight.detach().abs()
    if isinstance(module, nn.modules.conv._ConvNd):
        w = module.weight.detach().abs().flatten(2).sum(-1)         # (out, in / groups)
        g = module.groups
        if g == 1:
            return w
        out, cin_g = w.shape
        cin = cin_g * g
        dense = w.new_zeros(out, cin)
        per = out // g
        for k in range(g):  # output block k reads only input block k
            dense[k * per:(k + 1) * per, k * cin_g:(k + 1) * cin_g] = w[k * per:(k + 1) * per]
        return dense
    raise CircuitlabError(f"no weight edges for a {type(module).__name__}; use "
                          f"edges='effective' (gradient x activation through any path)")


def first_weight_layer(model: nn.Module, path: str) -> tuple[str, nn.Module]:
    """The first conv or linear module at or inside ``path`` (registration order)."""
    root = model.get_submodule(path) if path else model
    for name, mod in root.named_modules():
        if isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)):
            return (f"{path}.{name}" if name and path else name or path), mod
    raise CircuitlabError(f"{path!r} holds no conv or linear layer")


def scores(l1: torch.Tensor, src_energy: torch.Tensor, src_units: Sequence[int],
           dst_units: Sequence[int], dst_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(len(dst), len(src)) edge scores ||W_{d,s}||_1 * E_s, times ``dst_scale[d]`` (the
    gradient variant's |d logit / d dst|) when given."""
    s = torch.as_tensor(list(src_units), dtype=torch.long)
    d = torch.as_tensor(list(dst_units), dtype=torch.long)
    out = l1[d][:, s] * src_energy[s][None, :]
    if dst_scale is not None:
        out = out * dst_scale[d][:, None]
    return out
