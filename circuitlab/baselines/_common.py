"""What every saliency method shares: the target class, the output map's shape and scale."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import CircuitlabError
from ..hooked_model import HookedModel


def target_classes(hm: HookedModel, x: torch.Tensor, target) -> torch.Tensor:
    """(B,) classes on the model's device: ``target`` broadcast, or the model's top-1."""
    if target is None:
        with torch.no_grad():
            return hm(x).argmax(-1)
    t = torch.as_tensor(target, device=x.device).long().reshape(-1)
    if t.numel() == 1:
        t = t.expand(x.shape[0])
    if t.numel() != x.shape[0]:
        raise CircuitlabError(f"target has {t.numel()} entries for a batch of {x.shape[0]}")
    return t


def to_input_map(sal: torch.Tensor, size, normalise: bool = True) -> torch.Tensor:
    """(B, h, w) or (B, 1, h, w) -> (B, 1, H, W) on the CPU, bilinear, scaled to max 1."""
    if sal.dim() == 3:
        sal = sal[:, None]
    sal = sal.detach().float()
    if tuple(sal.shape[-2:]) != tuple(size):
        sal = F.interpolate(sal, size=tuple(size), mode="bilinear", align_corners=False)
    sal = sal.cpu()
    if normalise:
        # min-max per image, as Grad-CAM and the libraries users compare against do
        flat = sal.flatten(1)
        lo, hi = flat.min(1).values, flat.max(1).values
        sal = (sal - lo.view(-1, 1, 1, 1)) / (hi - lo).clamp_min(1e-12).view(-1, 1, 1, 1)
    return sal


def prefix_tokens(hm: HookedModel, n_tokens: int) -> tuple[int, int]:
    """(number of class/register tokens, patch grid side) of a token sequence of a ViT."""
    model = hm.model
    n_prefix = getattr(model, "num_prefix_tokens", None)
    if n_prefix is None:
        n_prefix = n_tokens - int(math.isqrt(n_tokens)) ** 2
    side = math.isqrt(n_tokens - n_prefix)
    if side * side != n_tokens - n_prefix:
        raise CircuitlabError(f"{n_tokens} tokens with {n_prefix} prefix tokens are no square "
                              f"patch grid; pass a layer with a spatial map")
    return n_prefix, side


def tokens_to_map(hm: HookedModel, tokens: torch.Tensor) -> torch.Tensor:
    """(B, N, D) tokens -> (B, D, side, side) patch map, prefix tokens dropped."""
    n_prefix, side = prefix_tokens(hm, tokens.shape[1])
    patches = tokens[:, n_prefix:]
    return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


def check_area(area: Optional[float]) -> None:
    if area is not None and not 0 < area < 1:
        raise CircuitlabError(f"area must lie in (0, 1), got {area}")
