"""The mask generator: a small U-Net from image to mask logits, binarised with a straight-through
estimator (forward: hard 0.5 threshold; backward: identity)."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn


def binarize_ste(p: torch.Tensor) -> torch.Tensor:
    """1[p > 0.5] in the forward pass, gradient of p in the backward pass."""
    return p + ((p > 0.5).to(p.dtype) - p).detach()


def keep_top_ste(p: torch.Tensor, fraction: Union[float, Sequence[float]]) -> torch.Tensor:
    """The ``fraction`` of cells with the highest keep probability set to 1, the rest to 0,
    per image (or one fraction per image); gradient of p in the backward pass. A hard area
    budget: the mask always keeps exactly round(fraction * cells) cells (at least one). Ties
    go as ``torch.topk`` breaks them, not by position as in ``metrics.binarize_at_area``
    (after Adam's first, sign-like step many logits tie, so the two pick different cells)."""
    flat = p.flatten(1)
    n = flat.shape[1]
    if isinstance(fraction, (int, float)):
        k = min(n, max(1, int(round(fraction * n))))
        hard = torch.zeros_like(flat).scatter_(1, flat.topk(k, dim=1).indices, 1.0)
    else:   # row by row, each as a batch of one: the same cells as that image alone
        hard = torch.zeros_like(flat)
        for i, f in enumerate(fraction):
            k = min(n, max(1, int(round(f * n))))
            hard[i:i + 1].scatter_(1, flat[i:i + 1].topk(k, dim=1).indices, 1.0)
    return p + (hard.view_as(p) - p).detach()


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU())


class MaskUNet(nn.Module):
    """U-Net with ``depth`` down levels; logits come out at stride ``2**mask_stride_log2``.

    The paper's generator is ``MaskUNet(width=32, depth=4, out_stride=1)`` (channels 32-512,
    full-resolution logits). A coarser mask (``out_stride`` 4 or 8) drops the costly
    full-resolution decoder levels, which is how per-image explanations stay fast on a CPU.
    ``init_keep`` sets the initial keep probability so optimisation starts from the whole image.
    """

    def __init__(self, in_chans: int = 3, width: int = 16, depth: int = 4, out_stride: int = 4,
                 init_keep: Optional[float] = 0.9):
        super().__init__()
        if out_stride < 1 or out_stride & (out_stride - 1) or out_stride > 2 ** depth:
            raise ValueError(f"out_stride must be a power of two <= 2**depth, got {out_stride}")
        self.depth, self.out_stride = depth, out_stride
        chans = [width * 2 ** i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        cin = in_chans
        for c in chans[:-1]:
            self.down.append(_double_conv(cin, c))
            cin = c
        self.bottleneck = _double_conv(chans[-2], chans[-1])
        # decoder levels from the bottleneck up to the output stride only
        self.n_up = depth - (out_stride.bit_length() - 1)
        self.up, self.dec = nn.ModuleList(), nn.ModuleList()
        for i in range(self.n_up):
            c_hi, c_lo = chans[depth - i], chans[depth - i - 1]
            self.up.append(nn.ConvTranspose2d(c_hi, c_lo, 2, stride=2))
            self.dec.append(_double_conv(2 * c_lo, c_lo))
        self.head = nn.Conv2d(chans[depth - self.n_up], 1, 1)
        if init_keep is not None:  # else PyTorch's init: a random first mask, as in the paper
            nn.init.zeros_(self.head.weight)
            nn.init.constant_(self.head.bias, float(torch.logit(torch.tensor(init_keep))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = 2 ** self.depth
        if h % m or w % m:  # pad to a multiple of the total stride, crop the logits back
            x = F.pad(x, (0, (-w) % m, 0, (-h) % m), mode="reflect")
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for up, dec in zip(self.up, self.dec):
            x = up(x)
            x = dec(torch.cat([x, skips.pop()], 1))
        logits = self.head(x)
        s = self.out_stride
        return logits[..., : -(-h // s), : -(-w // s)]


class MaskGrid(nn.Module):
    """One free logit per mask cell: the lightest generator ("a U-Net of depth 0").

    Randomly initialised (N(0, ``init_std``)) like the paper's generator, so the first hard mask
    is random and every cell is tried both ways early; per image it converges in far fewer
    steps than a U-Net from scratch (measured on the synthetic benchmark).
    """

    def __init__(self, shape: tuple, init_std: float = 1.0, seed: int = 0):
        super().__init__()
        # every image of the batch starts from the draw ``seed`` gives one image, so an
        # image's mask does not depend on the batch it is explained in
        one = torch.randn(tuple(shape[1:]), generator=torch.Generator().manual_seed(seed))
        self.logits = nn.Parameter(init_std * one.expand(tuple(shape)).clone())

    @classmethod
    def from_logits(cls, logits: torch.Tensor) -> "MaskGrid":
        """A grid starting from given logits (B, 1, h, w): refines an amortized mask."""
        grid = cls(tuple(logits.shape))
        with torch.no_grad():
            grid.logits.copy_(logits.detach())
        return grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits


class SmoothGrid(MaskGrid):
    """Free logits on a coarse grid of ``shape`` (B, 1, c, c), bilinearly upsampled to
    ``side`` x ``side`` keep logits: thresholded, the mask is a few smooth blobs of about a
    coarse cell's size or more, never isolated pixels, so it reads as regions of the image.
    ``start_keep``: the logits start at logit(start_keep) + N(0, 0.5), the whole image kept
    and shrinking, instead of N(0, ``init_std``), a random first mask."""

    def __init__(self, shape: tuple, side: int, init_std: float = 1.0, seed: int = 0,
                 start_keep: Optional[float] = None):
        super().__init__(shape, init_std if start_keep is None else 0.5, seed)
        if start_keep is not None:  # every cell near start_keep: shrink from the whole image
            with torch.no_grad():
                self.logits.add_(float(torch.logit(torch.tensor(start_keep))))
        self.side = side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.logits, size=(self.side, self.side), mode="bilinear",
                             align_corners=False)
