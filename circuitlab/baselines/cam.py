"""Grad-CAM (Selvaraju et al. 2017) and Grad-CAM++ (Chattopadhay et al. 2018).

>>> sal = grad_cam(hm, x)                          # (B, 1, H, W), max 1 per image
>>> sal = grad_cam_pp(hm, x, layer="layer3")

Both read the layer's activation A and d logit_y / d A through ``hm.run_with_cache``. The
default layer is the last spatial map before global pooling (CNNs) or the input of the last
block's attention norm (``blocks.-1.norm1``, ViTs: the recipe the ``grad-cam`` package
documents), whose patch tokens are laid back on their grid.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import CircuitlabError
from ..hooked_model import HookedModel
from ._common import target_classes, to_input_map, tokens_to_map


def default_layer(hm: HookedModel) -> str:
    """The layer Grad-CAM reads when none is given."""
    if hm.family.transformer:
        blocks = hm.family.blocks
        if blocks and f"{blocks[-1]}.norm1" in hm.hook_points:
            return f"{blocks[-1]}.norm1"
    best = None
    for p in hm.hook_points.values():
        if (p.io == "output" and p.call == 0 and p.alias_of is None and len(p.shape) == 4
                and p.unit_axis == 1 and p.shape[2] * p.shape[3] > 1):
            if best is None or p.order > best.order:
                best = p
    if best is None:
        raise CircuitlabError(f"{hm.name} has no spatial feature map for Grad-CAM; pass "
                              f"layer= (see `circuitlab layers`)")
    return best.name


def _activation_and_grad(hm, x, target, layer):
    layer = layer or default_layer(hm)
    if layer not in hm.hook_points:
        raise CircuitlabError(f"unknown layer {layer!r} for {hm.name}; list them with "
                              f"`circuitlab layers --model ...`")
    t = target_classes(hm, x, target)
    _, cache = hm.run_with_cache(x, names=[layer], grads=True, target=t)
    a, g = cache[layer], cache.grads[layer]
    if a.dim() == 3:                        # tokens (B, N, D) of a ViT
        a, g = tokens_to_map(hm, a), tokens_to_map(hm, g)
    if a.dim() != 4:
        raise CircuitlabError(f"Grad-CAM needs a (B, C, h, w) map or (B, N, D) tokens; "
                              f"{layer!r} gives {tuple(a.shape)}")
    return a.float(), g.float()


def grad_cam(hm: HookedModel, x: torch.Tensor, target=None, layer: Optional[str] = None
             ) -> torch.Tensor:
    """ReLU(sum_c w_c A_c), w_c = spatial mean of d logit_y / d A_c."""
    x = hm.check_input(x)
    a, g = _activation_and_grad(hm, x, target, layer)
    cam = torch.relu((g.mean((2, 3), keepdim=True) * a).sum(1))
    return to_input_map(cam, x.shape[-2:])


def grad_cam_pp(hm: HookedModel, x: torch.Tensor, target=None, layer: Optional[str] = None
                ) -> torch.Tensor:
    """Grad-CAM++: channel weights sum_ij alpha_ij ReLU(g_ij), with the closed-form alpha of
    an exponential score (powers of the first gradient stand in for higher derivatives)."""
    x = hm.check_input(x)
    a, g = _activation_and_grad(hm, x, target, layer)
    g2, g3 = g.pow(2), g.pow(3)
    denom = 2 * g2 + a.sum((2, 3), keepdim=True) * g3
    alpha = g2 / torch.where(denom != 0, denom, torch.ones_like(denom))
    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
    w = (alpha * torch.relu(g)).sum((2, 3), keepdim=True)
    cam = torch.relu((w * a).sum(1))
    return to_input_map(cam, x.shape[-2:])
