"""Certified minimality of a mask, region by region.

A mask is *locally minimal* here when every one of its connected regions (8-connectivity)
is necessary: deleting that region alone (setting it to the dataset mean, as the rest of the
image already is) loses the top-1 label. ``certify`` prunes regions that are not necessary
(those whose deletion leaves the surest prediction first, as many together as still keep the
label) and checks again, until all that remain are. It is certified against single-region
deletions only: a smaller mask that is not a subset of whole regions, or that drops two
regions at once while keeping the label, is not ruled out (the paper names formal
minimality as future work).

>>> cert = certify(hm, x, ex.mask)[0]
>>> cert.mask, cert.locally_minimal, cert.regions      # one row per kept region
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd
import torch
from scipy import ndimage

from ..hooked_model import HookedModel
from ..metrics import STRUCTURE_8


@dataclass
class Certificate:
    """One image's mask after pruning, and what each of its regions does."""

    mask: torch.Tensor         # (1, 1, H, W), the pruned mask
    regions: pd.DataFrame      # region, pixels, p_without, kept_without, necessary
    pruned: int                # regions removed because the label survived without them
    locally_minimal: bool      # every remaining region is necessary (and the label is kept)
    kept: bool                 # the pruned mask keeps the top-1 label


@torch.no_grad()
def masked_predictions(hm: HookedModel, x: torch.Tensor, masks: torch.Tensor, target: int,
                       batch_size: int = 32):
    """p_target and whether top-1 is ``target`` for ``x`` (1, C, H, W) under each of
    ``masks`` (N, 1, H, W), the rest at the dataset mean."""
    probs, kept = [], []
    for i in range(0, masks.shape[0], batch_size):
        logits = hm(masks[i:i + batch_size] * x)
        probs.append(logits.softmax(-1)[:, target].cpu())
        kept.append((logits.argmax(-1) == target).cpu())
    return torch.cat(probs), torch.cat(kept)


def _deleting(mask, labels, groups):
    """``mask`` with each group of region ids deleted: (len(groups), 1, H, W)."""
    lab = torch.from_numpy(labels).to(mask.device)
    return torch.stack([mask[0] * ~torch.isin(lab, torch.tensor(g, device=mask.device))
                        for g in groups])


def _removable_prefix(hm, x, mask, labels, order, target) -> int:
    """A prefix length j of ``order`` whose regions deleted together keep the label, by
    bisection (one forward a probe): order[:1] keeps it (it was checked alone), and where
    order[:mid] keeps it the search moves up. The label need not fall monotonically along
    the prefixes, so j is a removable prefix, not always the longest one."""
    lo, hi = 1, len(order)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        _, kept = masked_predictions(hm, x, _deleting(mask, labels, [order[:mid]]), target)
        lo, hi = (mid, hi) if bool(kept[0]) else (lo, mid - 1)
    return lo


@torch.no_grad()
def certify_one(hm: HookedModel, x: torch.Tensor, mask: torch.Tensor, target: int,
                max_rounds: int = 50, batch_size: int = 32) -> Certificate:
    """``certify`` for one image ``x`` (1, C, H, W) and its mask (1, 1, H, W).

    Each round deletes every region alone; of those the label survives without, ranked by
    the confidence left, a prefix that can go together (found by bisection) is deleted, so a
    speckled mask of a hundred regions takes a few rounds, not a hundred."""
    mask = (mask > 0.5).float().to(x.device)
    kept = bool(hm(mask * x).argmax(-1).item() == target)
    pruned, rounds = 0, 0
    while True:
        labels, n = ndimage.label(mask[0, 0].cpu().numpy() > 0.5, structure=STRUCTURE_8)
        if n == 0 or not kept:
            break
        ids = list(range(1, n + 1))
        p_without, kept_without = masked_predictions(
            hm, x, _deleting(mask, labels, [[i] for i in ids]), target, batch_size)
        if not kept_without.any() or rounds == max_rounds:
            break
        order = [ids[i] for i in torch.argsort(-p_without) if kept_without[i]]
        j = _removable_prefix(hm, x, mask, labels, order, target)
        mask = mask * torch.from_numpy(~np.isin(labels, order[:j])).to(mask)
        pruned, rounds = pruned + j, rounds + 1
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:] if n else np.zeros(0, int)
    table = pd.DataFrame({"region": np.arange(1, n + 1), "pixels": sizes})
    if n and kept:
        table["p_without"] = p_without.numpy()
        table["kept_without"] = kept_without.numpy()
        table["necessary"] = ~kept_without.numpy()
    minimal = bool(kept and n and not kept_without.any())
    return Certificate(mask=mask.cpu(), regions=table.sort_values("pixels", ascending=False)
                       .reset_index(drop=True), pruned=pruned, locally_minimal=minimal,
                       kept=kept)


def certify(hm: HookedModel, x: torch.Tensor, mask: torch.Tensor,
            target: Optional[torch.Tensor] = None, max_rounds: int = 50) -> list:
    """A ``Certificate`` per image of ``x`` (B, C, H, W) for its binary ``mask`` (B, 1, H, W)
    at input resolution; ``target``: the classes to keep (default the model's top-1 on x).
    Costs one batched forward of the mask's regions and a few single forwards per pruning
    round (``max_rounds`` at most; a mask still pruning then is not certified)."""
    x = hm.check_input(x)
    if target is None:
        with torch.no_grad():
            target = hm(x).argmax(-1)
    return [certify_one(hm, x[i:i + 1], mask[i:i + 1], int(target[i]), max_rounds)
            for i in range(x.shape[0])]
