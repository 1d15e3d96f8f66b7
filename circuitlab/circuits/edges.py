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

import kernels

from ..errors import CircuitlabError


def _weight_module(module: nn.Module) -> nn.Module:
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        return module
    raise CircuitlabError(f"no weight edges for a {type(module).__name__}; use "
                          f"edges='effective' (gradient x activation through any path)")


def weight_l1(module: nn.Module) -> torch.Tensor:
    """(out units, in units) matrix of ||W_{d,s}||_1 (summed over the kernel)."""
    m = _weight_module(module)
    return kernels.reference.weight_l1(m.weight, getattr(m, "groups", 1))


def first_weight_layer(model: nn.Module, path: str) -> tuple[str, nn.Module]:
    """The first conv or linear module at or inside ``path`` (registration order)."""
    root = model.get_submodule(path) if path else model
    for name, mod in root.named_modules():
        if isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)):
            return (f"{path}.{name}" if name and path else name or path), mod
    raise CircuitlabError(f"{path!r} holds no conv or linear layer")


def scores(module: nn.Module, src_energy: torch.Tensor, src_units: Sequence[int],
           dst_units: Sequence[int], dst_scale: Optional[torch.Tensor] = None,
           topk: Optional[int] = None):
    """``(l1, scores)``, each (len(dst), len(src)): ||W_{d,s}||_1 and ||W_{d,s}||_1 * E_s,
    times ``dst_scale[d]`` (the gradient variant's |d logit / d dst|) when given; with
    ``topk``, the best ``topk`` sources per destination ``(values, indices into src_units)``.
    The fused Triton op on a GPU, its torch reference elsewhere (``kernels.edge_scores``)."""
    m = _weight_module(module)
    return kernels.edge_scores(m.weight, src_energy.to(m.weight.device), src_units, dst_units,
                               getattr(m, "groups", 1), dst_scale, topk)
