"""Every sufficient reason: disjoint explanations of one decision, each sufficient alone.

A model often has several independent reasons for one decision (the paper's two otters).
``all_reasons`` explains the image, deletes what that explanation kept (sets it to the
dataset mean), explains what is left for the same class, and so on: each reason is found on
the image without the earlier ones, so the reasons are disjoint, and each is accepted only
if it keeps the class as top-1 on its own (the rest of the image at the mean). The search
stops after ``k`` reasons, or when no mask of what is left keeps the class.

>>> found = all_reasons(hm, x, k=3)[0]        # per image: its reasons, surest first
>>> [(r.area, r.confidence) for r in found]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import CircuitlabError
from ..hooked_model import HookedModel
from ..metrics import target_classes
from .certify import certify, masked_predictions
from .config import ExplainConfig
from .optimize import Explanation, explain


@dataclass
class Reason:
    """One sufficient reason: its mask (1, 1, H, W), found ``order``-th."""

    mask: torch.Tensor
    confidence: float          # p_target with only this reason shown
    area: float
    order: int                 # 1 = found first
    explanation: Explanation   # the run that found it (on the image minus earlier reasons)


def reasons_of_one(hm: HookedModel, x: torch.Tensor, k: int, target: int,
                   config: Optional[ExplainConfig], seed: int, minimal: bool,
                   first: Optional[Explanation] = None) -> list:
    """``all_reasons`` for one image (1, C, H, W); ``first``: its free explanation (before any
    pruning) when already run with this target, reused as the first reason."""
    removed = torch.zeros_like(x[:, :1])
    found = []
    for i in range(k):
        rest = (1 - removed) * x
        ex = first if i == 0 and first is not None else \
            explain(hm, rest, config, seed=seed + i, target=target)
        mask = ex.mask.to(x.device)
        if minimal:   # pruned, not searched down: see all_reasons
            mask = certify(hm, rest, mask, torch.tensor([target]))[0].mask.to(x.device)
        mask = mask * (1 - removed)
        if not bool(ex.found[0]) or mask.sum() == 0 or \
                (1 - removed - mask).clamp_min(0).sum() == 0:  # nothing left outside it
            break
        confidence, kept = masked_predictions(hm, x, mask, target)
        if not kept[0]:
            break
        found.append(Reason(mask.cpu(), float(confidence[0]), float(mask.mean()), i + 1, ex))
        removed = (removed + mask).clamp(max=1)
    return sorted(found, key=lambda r: -r.confidence)


def all_reasons(hm: HookedModel, x: torch.Tensor, k: int = 3,
                config: Optional[ExplainConfig] = None, *, target=None, seed: int = 0,
                minimal: bool = True) -> list:
    """Per image of ``x``, up to ``k`` disjoint reasons (``Reason``), each keeping ``target``
    (default the model's top-1) on its own, ordered by confidence; the first entry is the
    image's ordinary explanation unless a later reason is surer. ``minimal``: each reason is
    pruned to necessary regions (``certify``) before the next is sought; it is not searched
    down to a smaller area (``minimize``), which would leave most of an object behind for
    the next reason to find again."""
    if not isinstance(k, int) or k < 1:
        raise CircuitlabError(f"k is the number of reasons to look for, at least 1; got {k!r}")
    x = hm.check_input(x)
    targets = target_classes(hm, x, target)
    return [reasons_of_one(hm, x[i:i + 1], k, int(targets[i]), config, seed, minimal)
            for i in range(x.shape[0])]
