"""Edge weights between units of two layers.

- ``weight_l1``: ||W_{d,s}||_1 over the kernel, as a dense (dst units, src units) matrix, for
  standard, grouped and depthwise convolutions (block-diagonal) and linear layers.
- ``scores``: ||W_{d,s}||_1 x E_s for chosen units (the fused op on a GPU), of a layer's own
  weight or of a composed path weight (``weight_scores``). The only caller of the edge-score op.

Blocks between taps are composed in ``paths``; where they do not compose, the readout's
effective edges (``effective``) take the linearised contribution
|sum_pos dD_d/dA_s * A_s| of each source unit to each destination unit.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..errors import CircuitlabError
from ..kernels import edge_scores
from ..kernels.reference import weight_l1 as _weight_l1


def _weight_module(module: nn.Module) -> nn.Module:
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        return module
    raise CircuitlabError(f"no weight edges for a {type(module).__name__}; use "
                          f"edges='effective' (gradient x activation through any path)")


def weight_l1(module: nn.Module) -> torch.Tensor:
    """(out units, in units) matrix of ||W_{d,s}||_1 (summed over the kernel)."""
    m = _weight_module(module)
    return _weight_l1(m.weight, getattr(m, "groups", 1))


def scores(module: nn.Module, src_energy: torch.Tensor, src_units: Sequence[int],
           dst_units: Sequence[int], dst_scale: Optional[torch.Tensor] = None,
           topk: Optional[int] = None):
    """``(l1, scores)``, each (len(dst), len(src)): ||W_{d,s}||_1 and ||W_{d,s}||_1 * E_s,
    times ``dst_scale[d]`` (the gradient variant's |d logit / d dst|) when given; with
    ``topk``, the best ``topk`` sources per destination ``(values, indices into src_units)``.
    The fused Triton op on a GPU, its torch reference elsewhere."""
    m = _weight_module(module)
    return weight_scores(m.weight, src_energy, src_units, dst_units, getattr(m, "groups", 1),
                         dst_scale, topk)


def weight_scores(weight: torch.Tensor, src_energy: torch.Tensor, src_units: Sequence[int],
                  dst_units: Sequence[int], groups: int = 1,
                  dst_scale: Optional[torch.Tensor] = None, topk: Optional[int] = None):
    """``scores`` for a weight tensor: a layer's own, or the (dst, src) weight of a composed
    path between two taps (``paths``), with groups=1."""
    return edge_scores(weight, src_energy.to(weight.device), src_units, dst_units, groups,
                       dst_scale, topk)
