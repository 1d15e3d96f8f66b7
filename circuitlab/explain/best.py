"""What the optimisation loop keeps per image: its best mask so far, its numbers, and its own
recent steps (early stop is decided per image)."""
from __future__ import annotations

import torch

from .config import ExplainConfig
from .objective import Objective


class BestMasks:
    """Per image: the best mask so far and its numbers, and its own recent steps (early
    stop is decided per image)."""

    def __init__(self, objective: Objective, size, budget: bool):
        b = objective.x.shape[0]
        self.objective, self.budget = objective, budget
        self.area = torch.full((b,), float("inf"))
        self.conf = torch.full((b,), -1.0)
        self.kept = torch.zeros(b, dtype=torch.bool)
        self.nec = torch.zeros(b, dtype=torch.bool)
        self.mask = torch.ones(b, 1, *size)
        self.soft = None            # rows that never keep the label keep the whole image
        self.stopped = torch.zeros(b, dtype=torch.long)
        self.recent = [[] for _ in range(b)]

    @torch.no_grad()
    def update(self, active: list, step: int, p: torch.Tensor, out) -> dict:
        """Take the better masks of this step; the step's means over ``active`` for the
        history."""
        obj, rows = self.objective, torch.tensor(active)
        kept = out.kept(obj.target[out.rows]).cpu()
        area = out.m_low.flatten(1).mean(1).cpu()
        nec_ok = obj.necessity_met(out)
        conf = out.logits_e.softmax(-1).gather(1, obj.target[out.rows, None]).squeeze(1).cpu()
        if self.budget:  # at the budget: kept beats lost, then the more confident
            old_kept, old_conf = self.kept[rows], self.conf[rows]
            better = torch.zeros_like(kept) if not obj.at_budget(step) else \
                (kept & ~old_kept) | ((kept == old_kept) & (conf > old_conf))
        else:  # the smallest label-keeping mask, preferring ones whose complement loses it
            old_nec, old_area = self.nec[rows], self.area[rows]
            better = kept & ((nec_ok & ~old_nec) | ((nec_ok == old_nec) & (area < old_area)))
        if self.soft is None:
            self.soft = torch.ones(self.mask.shape[0], *p.shape[1:])
        won = rows[better]
        self.area[won], self.conf[won] = area[better], conf[better]
        self.nec[won] |= nec_ok[better]
        self.kept[won] |= kept[better]
        self.mask[won] = out.mask[better].detach().cpu().to(self.mask.dtype)
        self.soft[won] = p[better].cpu()
        binary = (p * (1 - p)).flatten(1).mean(1).cpu()
        for j, i in enumerate(active):
            self.recent[i] = (self.recent[i] + [(float(binary[j]), bool(kept[j]),
                                                 float(area[j]))])[-obj.cfg.patience:]
            self.stopped[i] = step
        return {"area": float(area.mean()), "kept": float(kept.float().mean())}

    def converged(self, i: int, cfg: ExplainConfig) -> bool:
        """Image ``i``'s mask is binary, keeps the label and stopped shrinking for
        ``patience`` steps."""
        last = self.recent[i][-cfg.patience:]
        if len(last) < cfg.patience:
            return False
        binary = last[-1][0] < 0.01
        kept = all(k for _, k, _ in last)
        flat = last[0][2] - last[-1][2] < 0.002
        return binary and kept and flat
