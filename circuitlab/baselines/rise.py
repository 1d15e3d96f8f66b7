"""RISE (Petsiuk et al. 2018): saliency as the score-weighted mean of random masks.

>>> sal = rise(hm, x, n_masks=2000)                    # (B, 1, H, W)

Masks: a ``cells`` x ``cells`` grid of Bernoulli(``p_keep``) cells, upsampled bilinearly to
(cells + 1) cell sizes and cropped at a random shift (smooth masks that are not aligned to the
grid); a masked image is m x (0 = the dataset mean). S = sum_i p_y(m_i x) m_i / (N p_keep).
The same masks serve every image of the batch; forwards run ``batch_size`` masks at a time.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import CircuitlabError
from ..hooked_model import HookedModel
from ._common import target_classes, to_input_map


def rise_masks(n: int, size, cells: int, p_keep: float, generator: torch.Generator
               ) -> torch.Tensor:
    """(n, 1, H, W) smooth random masks in [0, 1]."""
    h, w = size
    ch, cw = math.ceil(h / cells), math.ceil(w / cells)
    grid = (torch.rand(n, 1, cells, cells, generator=generator) < p_keep).float()
    up = F.interpolate(grid, size=((cells + 1) * ch, (cells + 1) * cw), mode="bilinear",
                       align_corners=False)
    dy = torch.randint(0, ch, (n,), generator=generator)
    dx = torch.randint(0, cw, (n,), generator=generator)
    return torch.stack([up[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


@torch.no_grad()
def rise(hm: HookedModel, x: torch.Tensor, target=None, n_masks: int = 2000, cells: int = 7,
         p_keep: float = 0.5, batch_size: int = 64, seed: int = 0) -> torch.Tensor:
    """RISE saliency for the target class (default: the model's top-1)."""
    if n_masks < 1 or cells < 1:
        raise CircuitlabError(f"n_masks and cells must be positive, got {n_masks}, {cells}")
    if not 0 < p_keep < 1:
        raise CircuitlabError(f"p_keep must lie in (0, 1), got {p_keep}")
    x = hm.check_input(x)
    t = target_classes(hm, x, target)
    g = torch.Generator().manual_seed(seed)
    sal = torch.zeros(x.shape[0], *x.shape[-2:])
    for j in range(0, n_masks, batch_size):
        m = rise_masks(min(batch_size, n_masks - j), x.shape[-2:], cells, p_keep, g)
        md = m.to(x.device, x.dtype)
        for i in range(x.shape[0]):
            p = hm.model(md * x[i:i + 1]).softmax(-1)[:, t[i]].float().cpu()
            sal[i] += (p.view(-1, 1, 1) * m[:, 0]).sum(0)
    return to_input_map(sal / (n_masks * p_keep), x.shape[-2:])
