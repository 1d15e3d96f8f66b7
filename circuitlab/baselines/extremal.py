"""Extremal perturbations (Fong, Patrick and Vedaldi 2019), preserve mode.

>>> mask = extremal_perturbation(hm, x, area=0.05)     # (B, 1, H, W) smooth mask in [0, 1]

For each image, a smooth mask m of fixed area a maximises the target logit of the perturbed
image m x + (1 - m) blur(x) (an 8-level blur pyramid, sigma up to ``max_blur`` at 224 px,
interpolated by m as in the paper). The area is imposed by the paper's rank constraint
||sort(m) - r_a||^2 with r_a holding a ones, its weight growing from 300 by 0.35 % per step;
SGD with momentum 0.9, lr 0.01, ``steps`` = 800, masks clamped to [0, 1], the image flipped
on every other step. The mask is parameterised on a grid of stride ``step`` (7 at 224 px)
and smoothed. One documented simplification: TorchRay smooths with a smooth-max of bumps of
radius ``sigma``; here the grid is upsampled bilinearly and blurred with a Gaussian of
sigma / 3 (the same support). Sizes scale with the input: at 32 px, step 1 and max blur 2.9.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import CircuitlabError
from ..backgrounds import gaussian_blur
from ..hooked_model import HookedModel
from ._common import check_area, target_classes


def _pyramid(x: torch.Tensor, levels: int, max_blur: float) -> torch.Tensor:
    """(levels, B, C, H, W): level 0 is the most blurred, the last is x itself."""
    out = []
    for k in range(levels):
        sigma = max_blur * (1 - k / (levels - 1))
        out.append(gaussian_blur(x, sigma) if sigma > 0.3 else x)
    return torch.stack(out)


def _unit(m: torch.Tensor) -> torch.Tensor:
    """m clamped to [0, 1] with the gradient of the identity. A plain clamp has zero
    gradient past its bounds, and the smoothed mask of an all-ones parameter (the paper's
    start) exceeds 1 by float rounding: with it, Lite0 masks never left 1 everywhere."""
    return m + (m.clamp(0, 1) - m).detach()


def _apply(pyr: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Interpolate the pyramid at levels m * (levels - 1), per pixel."""
    n = pyr.shape[0]
    pos = _unit(m) * (n - 1)                                       # (B, 1, H, W)
    lo = pos.floor().clamp(max=n - 2)
    frac = pos - lo
    lo = lo.long()
    onehot = F.one_hot(lo[:, 0], n).permute(3, 0, 1, 2).unsqueeze(2).to(pyr.dtype)
    below = (onehot * pyr).sum(0)
    above = (torch.roll(onehot, 1, dims=0) * pyr).sum(0)
    return below + frac * (above - below)


def extremal_perturbation(hm: HookedModel, x: torch.Tensor, target=None, area: float = 0.1,
                          steps: int = 800, lr: float = 0.01, step: int = None,
                          sigma: float = None, max_blur: float = None, levels: int = 8,
                          regul_weight: float = None, jitter: bool = True) -> torch.Tensor:
    """Preserve-mode extremal perturbation masks at ``area``, batched over images.

    ``regul_weight`` defaults to the paper's 300 from 128 px up and to 30 below: on the 32 px
    synthetic benchmark 300 meets the area with masks off the object, so the baseline is
    compared at its best setting (docs/results.md, "Design choices, measured")."""
    check_area(area)
    if steps < 1:
        raise CircuitlabError(f"steps must be positive, got {steps}")
    x = hm.check_input(x)
    b, _, h, w = x.shape
    scale = min(h, w) / 224
    step = step or max(1, round(7 * scale))
    sigma = sigma or 21 * scale
    max_blur = max_blur or 20 * scale
    regul_weight = regul_weight or (300.0 if min(h, w) >= 128 else 30.0)
    t = target_classes(hm, x, target)
    pyr = _pyramid(x.detach(), levels, max_blur)
    gh, gw = -(-h // step) + 1, -(-w // step) + 1
    pmask = torch.ones(b, 1, gh, gw, device=x.device, requires_grad=True)
    opt = torch.optim.SGD([pmask], lr=lr, momentum=0.9, dampening=0.9)
    ref = torch.zeros(h * w, device=x.device)
    ref[int(round(h * w * (1 - area))):] = 1
    weight = regul_weight
    params = [p.requires_grad for p in hm.model.parameters()]
    for p in hm.model.parameters():
        p.requires_grad_(False)
    try:
        for k in range(steps):
            m = _smooth(pmask, (h, w), step, sigma)
            xp = _apply(pyr, m)
            if jitter and k % 2 == 0:
                xp = xp.flip(-1)
            with torch.enable_grad():
                reward = hm.model(xp).gather(1, t[:, None]).squeeze(1)
                regul = (m.flatten(1).sort(1).values - ref).pow(2).mean(1)
                energy = (reward - weight * regul).sum()
            # autograd.grad, not .backward(): nnsight patches Tensor.backward
            pmask.grad, = torch.autograd.grad(-energy, [pmask])
            opt.step()
            with torch.no_grad():
                pmask.clamp_(0, 1)
            weight *= 1.0035
    finally:
        for p, r in zip(hm.model.parameters(), params):
            p.requires_grad_(r)
    with torch.no_grad():
        return _smooth(pmask, (h, w), step, sigma).float().cpu()


def _smooth(pmask: torch.Tensor, size, step: int, sigma: float) -> torch.Tensor:
    h, w = size
    gh, gw = pmask.shape[-2:]
    up = F.interpolate(pmask, size=(gh * step, gw * step), mode="bilinear", align_corners=False)
    up = up[..., step // 2:step // 2 + h, step // 2:step // 2 + w]
    if sigma / 3 > 0.3:
        up = gaussian_blur(up, sigma / 3)
    return _unit(up)
