"""Integrated Gradients (Sundararajan et al. 2017).

>>> sal = integrated_gradients(hm, x, steps=32)                 # (B, 1, H, W)
>>> attr = integrated_gradients(hm, x, reduce=None)             # (B, C, H, W) attributions

attr = (x - x0) * sum_k w_k d logit_y / d x at x0 + a_k (x - x0), trapezoid weights over
``steps`` evenly spaced a_k in [0, 1] (captum's ``riemann_trapezoid``); the baseline x0 is
the dataset mean (0 in normalised space) unless given. Gradients are taken through the hooked
model in batches of interpolated images.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import CircuitlabError
from ..hooked_model import HookedModel
from ._common import target_classes, to_input_map

REDUCTIONS = ("positive", "abs", "sum")


def _trapezoid(steps: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    alphas = torch.linspace(0, 1, steps, device=device)
    w = torch.full((steps,), 1.0 / (steps - 1), device=device)
    w[0] = w[-1] = 0.5 / (steps - 1)
    return alphas, w


def integrated_gradients(hm: HookedModel, x: torch.Tensor, target=None,
                         baseline: Optional[torch.Tensor] = None, steps: int = 32,
                         batch_size: int = 32, reduce: Optional[str] = "positive"
                         ) -> torch.Tensor:
    """IG attributions; ``reduce`` turns them into a map: ``positive`` (ReLU of the sum over
    channels: evidence for the class, the default for keep-the-decision comparisons),
    ``abs`` (|sum|), ``sum``, or None for the raw (B, C, H, W) attributions."""
    if steps < 2:
        raise CircuitlabError(f"steps must be at least 2, got {steps}")
    if reduce is not None and reduce not in REDUCTIONS:
        raise CircuitlabError(f"reduce must be one of {REDUCTIONS} or None, got {reduce!r}")
    x = hm.check_input(x)
    x0 = torch.zeros_like(x) if baseline is None else hm.check_input(
        baseline.expand_as(x) if baseline.dim() == 4 else baseline)
    if x0.shape != x.shape:
        raise CircuitlabError(f"baseline shape {tuple(x0.shape)} does not match the input "
                              f"{tuple(x.shape)}")
    t = target_classes(hm, x, target)
    alphas, w = _trapezoid(steps, x.device)
    total = torch.zeros_like(x, dtype=torch.float32)
    for i in range(x.shape[0]):
        delta = x[i] - x0[i]
        for j in range(0, steps, batch_size):
            a = alphas[j:j + batch_size]
            pts = (x0[i] + a.view(-1, 1, 1, 1) * delta).detach().requires_grad_(True)
            with torch.enable_grad():
                logit = hm.model(pts)[:, t[i]]
                # weights inside the sum: one backward per batch gives the weighted gradient
                g, = torch.autograd.grad((logit * w[j:j + batch_size]).sum(), pts)
            total[i] += g.sum(0).float()
    attr = (x - x0).float() * total
    if reduce is None:
        return attr.detach().cpu()
    s = attr.sum(1)
    s = torch.relu(s) if reduce == "positive" else s.abs() if reduce == "abs" else s
    return to_input_map(s, x.shape[-2:], normalise=reduce != "sum")
