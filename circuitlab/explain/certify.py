"""Certified minimality of a mask, region by region.

A mask is *locally minimal* here when every one of its connected regions (8-connectivity)
is necessary: deleting that region alone (setting it to the dataset mean, as the rest of the
image already is) loses the top-1 label, or, given a confidence ``floor``, drops p_target
below it (the decision at the confidence asked for, not a label held at 0.1). ``certify``
prunes regions that are not necessary (those whose deletion leaves the surest prediction
first, as many together as still keep the decision) and checks again, until all that
remain are. It is certified against single-region deletions only: a smaller mask that is
not a subset of whole regions, or that drops two regions at once while keeping the label,
is not ruled out (the paper names formal minimality as future work).

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
    regions: pd.DataFrame      # region, pixels, p_without, kept_without (the decision
    #                            holds without it), necessary
    pruned: int                # regions removed because the label survived without them
    locally_minimal: bool      # every remaining region is necessary (and the label is kept)
    kept: bool                 # the pruned mask keeps the top-1 label (and the floor)


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


def _holds(hm, x, masks, target, floor, batch_size=32):
    """p_target under each mask and whether the decision holds there: top-1 is ``target``
    and, with a ``floor``, p_target >= floor."""
    p, kept = masked_predictions(hm, x, masks, target, batch_size)
    return p, kept & (p >= floor) if floor is not None else kept


def _removable_prefix(hm, x, mask, labels, order, target, floor) -> int:
    """A prefix length j of ``order`` whose regions deleted together keep the label, by
    bisection (one forward a probe): order[:1] keeps it (it was checked alone), and where
    order[:mid] keeps it the search moves up. The label need not fall monotonically along
    the prefixes, so j is a removable prefix, not always the longest one."""
    lo, hi = 1, len(order)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        _, kept = _holds(hm, x, _deleting(mask, labels, [order[:mid]]), target, floor)
        lo, hi = (mid, hi) if bool(kept[0]) else (lo, mid - 1)
    return lo


@torch.no_grad()
def certify_one(hm: HookedModel, x: torch.Tensor, mask: torch.Tensor, target: int,
                max_rounds: int = 50, batch_size: int = 32,
                floor: Optional[float] = None) -> Certificate:
    """``certify`` for one image ``x`` (1, C, H, W) and its mask (1, 1, H, W).

    Each round deletes every region alone; of those the label survives without, ranked by
    the confidence left, a prefix that can go together (found by bisection) is deleted, so a
    speckled mask of a hundred regions takes a few rounds, not a hundred."""
    mask = (mask > 0.5).float().to(x.device)
    kept = bool(_holds(hm, x, mask, target, floor)[1][0])
    pruned, rounds = 0, 0
    while True:
        labels, n = ndimage.label(mask[0, 0].cpu().numpy() > 0.5, structure=STRUCTURE_8)
        if n == 0 or not kept:
            break
        ids = list(range(1, n + 1))
        p_without, kept_without = _holds(
            hm, x, _deleting(mask, labels, [[i] for i in ids]), target, floor, batch_size)
        if not kept_without.any() or rounds == max_rounds:
            break
        order = [ids[i] for i in torch.argsort(-p_without) if kept_without[i]]
        j = _removable_prefix(hm, x, mask, labels, order, target, floor)
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
            target: Optional[torch.Tensor] = None, max_rounds: int = 50,
            floor: Optional[torch.Tensor] = None) -> list:
    """A ``Certificate`` per image of ``x`` (B, C, H, W) for its binary ``mask`` (B, 1, H, W)
    at input resolution; ``target``: the classes to keep (default the model's top-1 on x);
    ``floor``: per image, the p_target the pruned mask must keep as well (default none: the
    label alone).
    Costs one batched forward of the mask's regions and a few single forwards per pruning
    round (``max_rounds`` at most; a mask still pruning then is not certified)."""
    x = hm.check_input(x)
    if target is None:
        with torch.no_grad():
            target = hm(x).argmax(-1)
    return [certify_one(hm, x[i:i + 1], mask[i:i + 1], int(target[i]), max_rounds,
                        floor=None if floor is None else float(floor[i]))
            for i in range(x.shape[0])]
