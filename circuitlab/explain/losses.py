"""The terms of the activation-matching objective, each a plain function of tensors.

Every term returns a scalar averaged over the batch, so weights mean the same at any batch size.
Reference definitions (the fused kernels of ``kernels/`` must match these exactly).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import CircuitlabError

DISTANCES = ("mse", "zmse", "cosine", "kl")


def _channels_last(t: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """(B, positions, C) view of a conv map (B, C, H, W) or a token tensor (B, N, C)."""
    t = t.movedim(channel_dim, -1)
    return t.reshape(t.shape[0], -1, t.shape[-1])


def activation_distance(a: torch.Tensor, b: torch.Tensor, kind: str = "mse",
                        channel_dim: int = 1, eps: float = 1e-6) -> torch.Tensor:
    """d(a, b) between the activations of the image (a, the target) and of the explanation (b).

    - ``mse``: mean squared difference.
    - ``zmse``: MSE after z-scoring each channel over its positions, per sample (population std,
      ``eps`` added to it): matches the pattern of a channel, not its scale.
    - ``cosine``: 1 - mean over positions of the cosine similarity across channels.
    - ``kl``: KL(softmax_c(a) || softmax_c(b)) over channels, averaged over positions.
    """
    if a.shape != b.shape:
        raise CircuitlabError(f"activation shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if kind == "mse":
        return (a - b).pow(2).mean()
    a3, b3 = _channels_last(a, channel_dim), _channels_last(b, channel_dim)  # (B, P, C)
    if kind == "zmse":
        def z(t):
            mu = t.mean(1, keepdim=True)
            # clamped so that sqrt has a finite gradient on a constant channel
            sd = t.var(1, keepdim=True, unbiased=False).clamp_min(1e-20).sqrt()
            return (t - mu) / (sd + eps)
        return (z(a3) - z(b3)).pow(2).mean()
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(a3, b3, dim=-1, eps=eps).mean()
    if kind == "kl":
        la, lb = a3.log_softmax(-1), b3.log_softmax(-1)
        return (la.exp() * (la - lb)).sum(-1).mean()
    raise CircuitlabError(f"unknown activation distance {kind!r}; use one of {DISTANCES}")


def activation_matching(acts_x: Sequence[torch.Tensor], acts_e: Sequence[torch.Tensor],
                        alphas: Sequence[float], kinds: Sequence[str],
                        channel_dims: Sequence[int]) -> torch.Tensor:
    """sum_l alpha_l * d_l(phi_l(x), phi_l(e))."""
    total = acts_e[0].new_zeros(())
    for a, b, w, k, c in zip(acts_x, acts_e, alphas, kinds, channel_dims):
        total = total + w * activation_distance(a, b, k, c)
    return total


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
