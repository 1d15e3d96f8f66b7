"""Pure-torch definitions of every fused op: the semantics the Triton kernels must reproduce.

Activation distances take the target activations ``a`` (the image's, no gradient needed) and
the explanation's ``b``, upcast both to fp32 (the kernels accumulate in fp32 too; float64
stays float64) and return an fp32 scalar averaged over the batch, so a weight means the same
at any batch size.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from circuitlab.errors import CircuitlabError

DISTANCES = ("mse", "zmse", "cosine", "kl")
# how the Triton op launches: one kernel per layer, or one for all layers of a dtype pair
LAUNCHES = ("per-layer", "one")
EPS = 1e-6


class KernelInputError(CircuitlabError, ValueError):
    """Inputs a fused op cannot take (shapes, names); the message says what to pass. A
    CircuitlabError, so callers need no translation: the CLI prints it as one line."""


def channels_last(t: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """(B, positions, C) view of a conv map (B, C, H, W) or a token tensor (B, N, C)."""
    t = t.movedim(channel_dim, -1)
    return t.reshape(t.shape[0], -1, t.shape[-1])


def activation_distance(a: torch.Tensor, b: torch.Tensor, kind: str = "mse",
                        channel_dim: int = 1, eps: float = EPS) -> torch.Tensor:
    """d(a, b) between the image's activations ``a`` (the target) and the explanation's ``b``.

    - ``mse``: mean squared difference.
    - ``zmse``: MSE after z-scoring each channel over its positions, per sample (population std,
      clamped at 1e-10 and ``eps`` added): matches the pattern of a channel, not its scale.
    - ``cosine``: 1 - mean over positions of cos(a, b) across channels; each norm is clamped
      at ``eps`` (a clamped norm is a constant for the gradient).
    - ``kl``: KL(softmax_c(a) || softmax_c(b)) over channels, averaged over positions.
    """
    if a.shape != b.shape:
        raise KernelInputError(f"activation shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if kind not in DISTANCES:
        raise KernelInputError(f"unknown activation distance {kind!r}; use one of {DISTANCES}")
    if b.dtype != torch.float64:      # float64 stays (gradcheck); everything else is fp32
        a, b = a.float(), b.float()
    if kind == "mse":
        return (a - b).pow(2).mean()
    a3, b3 = channels_last(a, channel_dim), channels_last(b, channel_dim)  # (B, P, C)
    if kind == "zmse":
        def z(t):
            mu = t.mean(1, keepdim=True)
            # clamped so that sqrt has a finite gradient on a constant channel
            sd = t.var(1, keepdim=True, unbiased=False).clamp_min(1e-20).sqrt()
            return (t - mu) / (sd + eps)
        return (z(a3) - z(b3)).pow(2).mean()
    if kind == "cosine":
        na = a3.norm(dim=-1).clamp_min(eps)
        nb = b3.norm(dim=-1).clamp_min(eps)
        return 1.0 - ((a3 * b3).sum(-1) / (na * nb)).mean()
    la, lb = a3.log_softmax(-1), b3.log_softmax(-1)
    return (la.exp() * (la - lb)).sum(-1).mean()


def activation_matching(acts_x: Sequence[torch.Tensor], acts_e: Sequence[torch.Tensor],
                        alphas: Sequence[float], kinds: Sequence[str],
                        channel_dims: Sequence[int]) -> torch.Tensor:
    """sum_l alpha_l * d_l(phi_l(x), phi_l(e)), fp32."""
    if not (len(acts_x) == len(acts_e) == len(alphas) == len(kinds) == len(channel_dims)):
        raise KernelInputError("activation matching needs one target, explanation, alpha, "
                               "distance and channel dim per layer")
    total = torch.zeros((), dtype=torch.float32, device=acts_e[0].device)
    for a, b, w, k, c in zip(acts_x, acts_e, alphas, kinds, channel_dims):
        total = total + w * activation_distance(a, b, k, c)
    return total


def weight_l1(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """(out units, in units) matrix of ||W_{d,s}||_1 over the kernel of a conv or linear
    weight; a grouped or depthwise conv is block-diagonal (output block g reads input block g)."""
    w = weight.detach().float().abs()
    w = w.flatten(2).sum(-1) if w.dim() > 2 else w                   # (out, in / groups)
    if groups == 1:
        return w
    out, cin_g = w.shape
    if out % groups:
        raise KernelInputError(f"{out} output units do not split into {groups} groups")
    per = out // groups
    # block g of the output reads block g of the input: one indexed write for all groups
    # (a loop over a depthwise conv's ~1000 groups was most of a Lite0 readout)
    dense = w.new_zeros(groups, per, groups, cin_g)
    g = torch.arange(groups, device=w.device)
    dense[g, :, g, :] = w.view(groups, per, cin_g)
    return dense.view(out, groups * cin_g)


def edge_scores(weight: torch.Tensor, src_energy: torch.Tensor, src_units: Sequence[int],
                dst_units: Sequence[int], groups: int = 1,
                dst_scale: Optional[torch.Tensor] = None, topk: Optional[int] = None):
    """Edge scores ||W_{d,s}||_1 * E_s (times ``dst_scale[d]``, the gradient variant) for the
    chosen destination and source units.

    Returns ``(l1, scores)``, both (len(dst), len(src)) fp32; with ``topk`` the ``topk`` best
    sources per destination instead: ``(values, indices)`` with indices into ``src_units``,
    best first (ties: the lower index first).
    """
    dev = weight.device
    s = torch.as_tensor(list(src_units), dtype=torch.long, device=dev)
    d = torch.as_tensor(list(dst_units), dtype=torch.long, device=dev)
    l1 = weight_l1(weight, groups)[d][:, s]
    sc = l1 * src_energy.float().to(dev)[s][None, :]
    if dst_scale is not None:
        sc = sc * dst_scale.float().to(dev)[d][:, None]
    if topk is None:
        return l1, sc
    k = min(int(topk), sc.shape[1])
    # stable: equal scores keep source order, as the kernel's first-max rule does
    order = torch.sort(sc, dim=1, descending=True, stable=True)
    return order.values[:, :k], order.indices[:, :k]
