"""Backgrounds r that fill the complement of a mask (the objective's robustness term, the
sufficiency metric, the baselines' blur), and the Gaussian blur they are made with.

Below explanations, metrics and baselines, which all use it; imports only ``errors`` and
``preprocessing``."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import CircuitlabError
from .preprocessing import normalize

KINDS = ("grey", "gaussian", "uniform", "blur")
RANDOM_KINDS = ("gaussian", "uniform")     # drawn anew each time; the others are fixed
# Who draws random fills from a seed. The metrics judge a mask with draws from ``seed``
# itself; an explainer fitting its mask to draws of its own must not see those, or "kept
# under noise" would count the draw it was fitted to (the region search and the robustness
# term's fixed backgrounds at seed 0 once did).
STREAMS = ("metrics", "regions", "objective", "robust")


def fill_generator(seed: int, stream: str) -> torch.Generator:
    """A generator for ``stream``'s fills: ``metrics`` is seeded with ``seed``; every other
    stream with a SeedSequence of (seed, its index), independent of the metrics' draws."""
    if stream not in STREAMS:
        raise CircuitlabError(f"unknown stream {stream!r}; use {', '.join(STREAMS)}")
    i = STREAMS.index(stream)
    state = seed if i == 0 else int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
    return torch.Generator().manual_seed(state)


def gaussian_blur(x: torch.Tensor, sigma: float, border: str = "reflect") -> torch.Tensor:
    """Separable Gaussian blur per channel, same size out. ``border``: ``reflect`` (an image:
    no dark rim) or ``zeros`` (a mask density: outside the image nothing is kept)."""
    if border not in ("reflect", "zeros"):
        raise CircuitlabError(f"border must be 'reflect' or 'zeros', got {border!r}")
    radius = max(1, int(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (radius,) * 4, mode="reflect") if border == "reflect" else \
        F.pad(x, (radius,) * 4)
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def make_backgrounds(x: torch.Tensor, config: dict, kinds: Sequence[str] = KINDS,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(len(kinds) * B, C, H, W) backgrounds in the model's normalised input space.

    grey: the dataset mean (0); gaussian: pixels ~ N(0.5, 0.25) clipped; uniform: pixels ~
    U(0, 1); blur: the image itself blurred with sigma = 1/20 of its size (keeps colours,
    removes shapes).
    """
    out = []
    shape = x.shape
    for kind in kinds:
        if kind == "grey":
            out.append(torch.zeros_like(x))
        elif kind == "gaussian":
            pix = (0.5 + 0.25 * torch.randn(shape, generator=generator)).clamp(0, 1)
            out.append(normalize(pix.to(x), config))
        elif kind == "uniform":
            out.append(normalize(torch.rand(shape, generator=generator).to(x), config))
        elif kind == "blur":
            out.append(gaussian_blur(x, sigma=max(1.0, min(shape[-2:]) / 20)))
        else:
            raise CircuitlabError(f"unknown background {kind!r}; use {', '.join(KINDS)}")
    return torch.cat(out)
