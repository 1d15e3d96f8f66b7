"""The terms of the activation-matching objective, each a plain function of tensors.

Every term returns a scalar averaged over the batch, so weights mean the same at any batch size.
The activation distances live in ``circuitlab.kernels`` (fused Triton op + its torch reference);
their input errors are CircuitlabErrors already.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import CircuitlabError
# d(a, b) per layer (mse, zmse, cosine, kl) and its sum over layers: the fused Triton kernel on
# a GPU, the torch reference elsewhere (CIRCUITLAB_KERNELS=torch forces the reference)
from ..kernels import DISTANCES, activation_matching
from ..kernels.reference import activation_distance

__all__ = ["DISTANCES", "activation_distance", "activation_matching", "class_ce", "logit_kl",
           "area", "area_rank", "binarization", "total_variation", "necessity_hinge"]


def class_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-log softmax(f(e))_y, batch mean."""
    return F.cross_entropy(logits, target)


def logit_kl(logits_x: torch.Tensor, logits_e: torch.Tensor, temperature: float = 2.0):
    """KL(softmax(f(x)/T) || softmax(f(e)/T)) * T^2, batch mean."""
    lx = (logits_x / temperature).log_softmax(-1)
    le = (logits_e / temperature).log_softmax(-1)
    return (lx.exp() * (lx - le)).sum(-1).mean() * temperature ** 2


def area(p: torch.Tensor) -> torch.Tensor:
    """Mean of the soft mask."""
    return p.mean()


def area_rank(p: torch.Tensor, target: float) -> torch.Tensor:
    """Mean squared gap between the sorted soft mask and a mask with exactly ``target`` of its
    cells on (Fong et al. 2019's area constraint): fixes how much is kept, and leaves *which*
    cells to the other terms."""
    flat = p.flatten(1)
    n = flat.shape[1]
    k = int(round(target * n))
    ref = torch.zeros(n, dtype=p.dtype, device=p.device)
    ref[:k] = 1
    return (flat.sort(dim=1, descending=True).values - ref).pow(2).mean()


def binarization(p: torch.Tensor) -> torch.Tensor:
    """mean(p (1 - p)): zero exactly when the soft mask is binary."""
    return (p * (1 - p)).mean()


def total_variation(p: torch.Tensor, neighbours: int = 4) -> torch.Tensor:
    """Mean absolute difference between neighbouring mask cells (B, 1, H, W).

    4: rows and columns (mean |dh| + mean |dw|, the paper's text); 8 adds the two diagonals
    weighted 1/sqrt(2) (the authors' code).
    """
    dh = (p[..., 1:, :] - p[..., :-1, :]).abs().mean()
    dw = (p[..., :, 1:] - p[..., :, :-1]).abs().mean()
    if neighbours == 4:
        return dh + dw
    if neighbours == 8:
        d1 = (p[..., 1:, 1:] - p[..., :-1, :-1]).abs().mean()
        d2 = (p[..., 1:, :-1] - p[..., :-1, 1:]).abs().mean()
        return dh + dw + (d1 + d2) / math.sqrt(2)
    raise CircuitlabError(f"total variation takes 4 or 8 neighbours, got {neighbours}")


def necessity_hinge(logits_x: torch.Tensor, logits_c: torch.Tensor, target: torch.Tensor,
                    mode: str = "prob", margin: float = 0.5) -> torch.Tensor:
    """Penalty while the complement (1 - m) x still supports the target class.

    ``prob``: relu(p_y(c) / p_y(x) - (1 - margin)), zero once the target probability dropped by
    at least ``margin`` (relative). ``logit``: relu(margin - (z_y(x) - z_y(c))), the hinge in
    the authors' code (margin 1 there).
    """
    idx = target[:, None]
    if mode == "prob":
        px = logits_x.softmax(-1).gather(1, idx).squeeze(1).detach()
        pc = logits_c.softmax(-1).gather(1, idx).squeeze(1)
        return F.relu(pc / px.clamp_min(1e-12) - (1 - margin)).mean()
    if mode == "logit":
        zx = logits_x.gather(1, idx).squeeze(1).detach()
        zc = logits_c.gather(1, idx).squeeze(1)
        return F.relu(margin - (zx - zc)).mean()
    raise CircuitlabError(f"necessity mode must be 'prob' or 'logit', got {mode!r}")
