"""The explanation objective for one batch of images: shared by per-image and amortized modes.

>>> obj = Objective(hm, x, cfg)            # one reference forward of x, no gradients
>>> loss, terms, out = obj(p, step)        # p: keep probabilities (B, 1, h, w)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..backgrounds import fill_generator, make_backgrounds
from ..errors import CircuitlabError
from ..hooked_model import HookedModel
from ..metrics import target_classes
from . import losses
from .config import ExplainConfig, default_alphas, default_distances
from .generator import binarize_ste, keep_top_ste


def resolve_taps(hm: HookedModel, cfg: ExplainConfig):
    """(hook points, alphas, distances, channel dims) for the configured taps."""
    names = list(cfg.taps) if cfg.taps else list(hm.taps)
    if not names:
        raise CircuitlabError(f"{hm.name} has no default taps; pass taps=(...) hook names")
    points = [hm.point(n) for n in names]
    for p in points:
        if p.unit_axis is None or len(p.shape) < 3:
            raise CircuitlabError(f"tap {p.name!r} (shape {p.shape}) has no channel and "
                                  f"position axes to match; choose a conv map or token layer")
    alphas = tuple(cfg.alphas) if cfg.alphas else default_alphas(len(names))
    kinds = tuple(cfg.distances) if cfg.distances else default_distances(
        len(names), hm.family.transformer)
    if len(alphas) != len(names) or len(kinds) != len(names):
        raise CircuitlabError(f"{len(names)} taps need as many alphas and distances, got "
                              f"{len(alphas)} and {len(kinds)}")
    for k in kinds:
        if k not in losses.DISTANCES:
            raise CircuitlabError(f"unknown distance {k!r}; use one of {losses.DISTANCES}")
    return points, alphas, kinds, tuple(p.unit_axis for p in points)


@dataclass
class StepOutput:
    m_low: torch.Tensor        # hard mask at the generator's resolution (straight-through)
    mask: torch.Tensor         # hard mask at input resolution
    logits_e: torch.Tensor     # f(m x)
    logits_c: Optional[torch.Tensor]   # f((1 - m) x) when the necessity term is on
    rows: Optional[torch.Tensor] = None  # which images of the objective's batch these are

    @torch.no_grad()
    def kept(self, target: torch.Tensor) -> torch.Tensor:
        """Top-1 kept, per image; ``target``: the targets of these rows."""
        return self.logits_e.argmax(-1) == target


class Objective:
    """Every term of the loss for a batch ``x`` against the frozen classifier ``hm``.

    The reference run on x (logits, tap activations, top-1 target) and the sufficiency
    backgrounds are computed once here; each call runs one batched forward of the explanation,
    the backgrounds drawn this step and the complement.
    """

    def __init__(self, hm: HookedModel, x: torch.Tensor, cfg: ExplainConfig,
                 rng: Union[None, torch.Generator, Sequence[torch.Generator]] = None,
                 target: Optional[torch.Tensor] = None,
                 budgets: Optional[Sequence[float]] = None):
        self.hm, self.x, self.cfg = hm, x, cfg
        # one area budget per image instead of cfg.area_budget (python floats: the same
        # arithmetic as one image's scalar budget)
        self.budgets = None if budgets is None else [float(v) for v in budgets]
        if self.budgets is not None and (cfg.area_budget is None or
                                         len(self.budgets) != x.shape[0]):
            raise CircuitlabError("budgets: one per image, with config.area_budget set")
        # one generator per image (its noise backgrounds and their order do not depend on
        # the batch), or one shared by the batch, drawn from image by image
        rng = rng or fill_generator(0, "objective")
        self.rngs = [rng] * x.shape[0] if isinstance(rng, torch.Generator) else list(rng)
        if len(self.rngs) != x.shape[0]:
            raise CircuitlabError(f"rng: one generator per image, {x.shape[0]}; got "
                                  f"{len(self.rngs)}")
        points, self.alphas, self.kinds, self.cdims = resolve_taps(hm, cfg)
        self.names = [p.name for p in points]
        # the loop's forwards and the reference one run alike (same precision and layout)
        self.read = hm.reader(self.names, cfg.execution)
        with torch.no_grad():
            self.logits_x, acts_x = self.read(x)
        self.target = self.logits_x.argmax(-1) if target is None else \
            target_classes(hm, x, target).to(x.device)
        if not 0 <= int(self.target.min()) <= int(self.target.max()) < self.logits_x.shape[-1]:
            raise CircuitlabError(f"target classes lie in 0..{self.logits_x.shape[-1] - 1}; "
                                  f"got {self.target.tolist()}")
        self.p_x = self.logits_x.softmax(-1).gather(1, self.target[:, None]).squeeze(1)
        self.acts_x = acts_x
        self.k = min(cfg.backgrounds_per_step, len(cfg.backgrounds)) if cfg.rob else 0
        # (kinds, B, C, H, W)
        self.backgrounds = torch.stack([
            make_backgrounds(x[i:i + 1], hm.data_config, cfg.backgrounds, self.rngs[i])
            for i in range(x.shape[0])], 1) if self.k else None

    def area_target(self, step: int) -> float:
        c = self.cfg
        return c.area_start * (c.area_end / c.area_start) ** ((step - 1) / max(1, c.steps - 1))

    def budget_at(self, step: int, rows: Optional[Sequence[int]] = None):
        """The kept fraction under ``area_budget``: 1 at step 1, the budget from the end of the
        warm-up on (geometric in between, so the mask is pared down from the whole image the
        way a deletion curve is, and the ranking of cells has time to form). With per-image
        ``budgets``: one fraction per image of ``rows``."""
        c = self.cfg
        warm = c.budget_warmup * (c.steps - 1)

        def at(budget: float) -> float:
            return budget ** min(1.0, (step - 1) / warm) if warm > 0 else budget
        if self.budgets is None:
            return at(c.area_budget)
        return [at(self.budgets[i]) for i in (rows if rows is not None
                                               else range(len(self.budgets)))]

    def at_budget(self, step: int) -> bool:
        return (step - 1) >= self.cfg.budget_warmup * (self.cfg.steps - 1)

    def __call__(self, p: torch.Tensor, step: int = 1, rows: Optional[Sequence[int]] = None):
        """(loss, {term: value}, StepOutput) for keep probabilities ``p`` (B, 1, h, w) of the
        images ``rows`` of x (default all): every term is a mean over those images."""
        cfg = self.cfg
        rows = list(range(self.x.shape[0])) if rows is None else [int(i) for i in rows]
        sel = torch.tensor(rows, device=self.x.device)
        x, target, logits_x = self.x[sel], self.target[sel], self.logits_x[sel]
        b = x.shape[0]
        m_low = binarize_ste(p) if cfg.area_budget is None else \
            keep_top_ste(p, self.budget_at(step, rows))
        m = F.interpolate(m_low, size=x.shape[-2:], mode="nearest")
        parts = [m * x]
        if self.k:
            nb = len(cfg.backgrounds)
            r = torch.stack([self.backgrounds[torch.randperm(nb, generator=self.rngs[i])
                                              [:self.k], i] for i in rows], 1)
            r = r.reshape(self.k * b, *x.shape[1:])                 # background j of image i
            mk = m.repeat(self.k, 1, 1, 1)                          # at row j * b + i
            parts.append(mk * x.repeat(self.k, 1, 1, 1) + (1 - mk) * r)
        if cfg.nec:
            parts.append((1 - m) * x)
        logits, acts = self.read(torch.cat(parts))
        logits_e = logits[:b]
        # lambda_act rides in the alphas and comes back out as a division, so the gradient
        # reaching the fused kernel is exactly 1 and its backward moves no memory
        lam = cfg.act if cfg.act else 1.0
        act = losses.activation_matching([a[sel] for a in self.acts_x],
                                         [a[:b] for a in acts],
                                         [a * lam for a in self.alphas], self.kinds,
                                         self.cdims) / lam
        terms = {
            "act": act,
            "ce": losses.class_ce(logits_e, target),
            "kl": losses.logit_kl(logits_x, logits_e, cfg.temperature),
            "area": losses.area(p) if cfg.area_mode == "mean" else
            losses.area_rank(p, self.area_target(step)),
            "bin": losses.binarization(p),
            "tv": losses.total_variation(p, cfg.tv_neighbours),
        }
        if self.k:
            terms["rob"] = losses.class_ce(logits[b:b + self.k * b], target.repeat(self.k))
        logits_c = None
        if cfg.nec:
            logits_c = logits[-b:]
            terms["nec"] = losses.necessity_hinge(logits_x, logits_c, target,
                                                  cfg.necessity_mode, cfg.necessity_margin)
        if cfg.area_budget is not None:  # the budget fixes the area; nothing to trade it for
            del terms["area"]
        loss = sum(getattr(cfg, name) * value for name, value in terms.items())
        return loss, terms, StepOutput(m_low, m, logits_e, logits_c, sel)

    @torch.no_grad()
    def necessity_met(self, out: StepOutput) -> torch.Tensor:
        """Per image of ``out``: the complement lowers p_target by at least the necessity
        margin."""
        if out.logits_c is None:
            return torch.ones(out.logits_e.shape[0], dtype=torch.bool)
        rows = out.rows if out.rows is not None else slice(None)
        pc = out.logits_c.softmax(-1).gather(1, self.target[rows, None]).squeeze(1)
        return (pc <= (1 - self.cfg.necessity_margin) * self.p_x[rows]).cpu()
