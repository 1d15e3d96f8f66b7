"""Per-image explanations: train a mask generator on one image against the frozen classifier.

>>> ex = explain(hm, x)                      # default preset for the model's family
>>> ex.mask.shape, ex.area, ex.history.tail()
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import pandas as pd
import torch
import torch.nn.functional as F

from ..backgrounds import gaussian_blur
from ..deprecations import renamed
from ..errors import CircuitlabError
from ..hooked_model import HookedModel
from .certify import certify, masked_predictions
from .config import ExplainConfig, preset
from .generator import MaskGrid, MaskUNet, SmoothGrid
from .objective import Objective


@dataclass
class Explanation:
    """A binary mask (B, 1, H, W) at the model's input resolution and what produced it."""

    mask: torch.Tensor            # 1 = kept, at input resolution
    soft: torch.Tensor            # keep probabilities at the generator's resolution
    explanation: torch.Tensor     # mask * x in normalised input space (0 = dataset mean)
    target: torch.Tensor          # the model's own top-1 on x
    history: pd.DataFrame         # loss terms and mask statistics per step
    steps: int
    seconds: float
    config: ExplainConfig
    found: Optional[torch.Tensor] = None   # per image: a step's mask kept the label (else the
    #                                        whole image, or under a budget the surest mask)
    certificates: Optional[list] = None    # minimal=True: per image, its regions' check
    search: Optional[list] = None          # minimal=True: per image, the area budgets tried

    @property
    def area(self) -> torch.Tensor:
        return self.mask.flatten(1).mean(1)

    def ranking(self) -> torch.Tensor:
        """The explanation as a saliency map (B, 1, H, W), to compare with other methods at
        any area (``metrics.binarize_at_area``): the mask's pixels first, ordered by their
        keep probability plus a Gaussian density of the mask (sigma 10 % of the side), so a
        smaller area keeps the mask's surest, densest core and a larger one grows it where it
        is; outside the mask the density orders the rest. Chosen on the synthetic
        benchmark's tuning images (seed 7, not the reported seed 123) against three other
        orders; what it bought: docs/results.md, "Design choices, measured".
        """
        m = self.mask.float()
        soft = F.interpolate(self.soft.float().to(m.device), size=m.shape[-2:],
                             mode="bilinear", align_corners=False)
        sigma = max(1.0, 0.1 * min(m.shape[-2:]))
        # the density of kept pixels, nothing kept outside the image: a mirrored border would
        # count a cluster in a corner four times
        density = gaussian_blur(m, sigma, border="zeros")
        return m * (1 + soft) + 0.5 * density + 1e-3 * soft


@renamed(generator="mask_net")
def explain(hm: HookedModel, x: torch.Tensor, config: Optional[ExplainConfig] = None, *,
            preset_name: str = "default", steps: Optional[int] = None, seed: int = 0,
            mask_net: Optional[torch.nn.Module] = None, minimal: bool = False,
            confidence: float = 1.0, target=None,
            progress: Optional[Callable[[int, dict], None]] = None) -> Explanation:
    """Minimal mask for each image of ``x`` (B, C, H, W), trained from scratch (per-image mode).

    ``mask_net``: a mask network to train instead of the one ``config.generator`` names
    (``generator=`` is its old name, kept for one release). ``target``: the class (or one per
    image) whose decision to explain; default the model's top-1 on each image. ``minimal``: the
    mask then goes through ``minimize`` (the smallest
    area budget at which the decision holds at ``confidence`` times the image's p_target,
    then pruned region by region and certified); ``search`` and ``certificates`` say how.

    Early stop (after ``min_steps``) once the mask is binary, the label is kept and the area has
    not shrunk for ``patience`` steps. Per image, the smallest label-keeping mask seen is
    returned, preferring masks whose complement loses the label; an image for which no step
    kept the label gets the whole image (mask of ones).

    With ``config.area_budget`` every mask keeps exactly that fraction of its cells once the
    warm-up is over; per image the returned mask is the one of those steps that kept the label
    with the highest target probability, or failing that, the highest target probability
    (``Explanation.found`` says which); no early stop.
    """
    cfg = config or preset(preset_name, hm.family.name, min(x.shape[-2:]))
    if minimal and cfg.area_budget is not None:
        raise CircuitlabError("minimal=True searches the area itself; drop area_budget")
    if steps is not None:
        cfg = cfg.replace(steps=int(steps), min_steps=min(cfg.min_steps, int(steps)))
    x = hm.check_input(x)
    b = x.shape[0]
    torch.manual_seed(seed)
    rng = torch.Generator().manual_seed(seed)
    net = mask_net if mask_net is not None else _mask_net(hm, x, cfg, seed)
    net = net.to(x.device).train()
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)

    # only the U-Net looks at the image; the grid ignores its input
    x_gen = F.avg_pool2d(x, cfg.input_scale) if cfg.generator == "unet" and \
        cfg.input_scale > 1 else x
    objective = Objective(hm, x, cfg, rng, target)
    target = objective.target

    budget = cfg.area_budget is not None
    rows, best_area = [], torch.full((b,), float("inf"))
    best_conf = torch.full((b,), -1.0)
    best_kept = torch.zeros(b, dtype=torch.bool)
    best_nec = torch.zeros(b, dtype=torch.bool)
    best_mask = torch.ones(b, 1, *x.shape[-2:])
    best_soft = None
    t0 = time.perf_counter()
    step = 0
    for step in range(1, cfg.steps + 1):
        p = torch.sigmoid(net(x_gen))                               # (B, 1, h, w)
        loss, terms, out = objective(p, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

        with torch.no_grad():
            kept = out.kept(target).cpu()
            hard_area = out.m_low.flatten(1).mean(1).cpu()
            nec_ok = objective.necessity_met(out)
            conf = out.logits_e.softmax(-1).gather(1, target[:, None]).squeeze(1).cpu()
            if budget:
                # at the budget: kept beats lost, then the more confident
                better = torch.zeros_like(kept) if not objective.at_budget(step) else \
                    (kept & ~best_kept) | ((kept == best_kept) & (conf > best_conf))
            else:
                # the smallest label-keeping mask, preferring ones whose complement loses it
                better = kept & ((nec_ok & ~best_nec) |
                                 ((nec_ok == best_nec) & (hard_area < best_area)))
            if best_soft is None:  # rows that never keep the label keep the whole image
                best_soft = torch.ones_like(p, device="cpu")
            if better.any():
                best_area = torch.where(better, hard_area, best_area)
                best_nec = best_nec | (better & nec_ok)
                best_conf = torch.where(better, conf, best_conf)
                best_kept = best_kept | (better & kept)
                best_mask[better] = out.mask[better].detach().cpu()
                best_soft[better] = p[better].detach().cpu()
        row = {"step": step, "loss": float(loss.detach()),
               **{n: float(v.detach()) for n, v in terms.items()},
               "area": float(hard_area.mean()), "kept": float(kept.float().mean())}
        rows.append(row)
        if progress:
            progress(step, row)
        # under a budget every step may still raise the confidence: no early stop
        if not budget and step >= cfg.min_steps and _converged(rows, cfg):
            break
    mask = best_mask.to(x.device)
    ex = Explanation(mask=mask, soft=best_soft, explanation=mask * x, target=target,
                     history=pd.DataFrame(rows), steps=step,
                     seconds=time.perf_counter() - t0, config=cfg,
                     found=best_kept if budget else torch.isfinite(best_area))
    return minimize(hm, x, ex, confidence=confidence, seed=seed) if minimal else ex


def _mask_net(hm: HookedModel, x: torch.Tensor, cfg: ExplainConfig, seed: int):
    """The mask network ``cfg.generator`` names, for a batch like ``x``."""
    b = x.shape[0]
    side = min(cfg.mask_size, x.shape[-2], x.shape[-1])
    if cfg.generator == "grid":
        return MaskGrid((b, 1, side, side), seed=seed)
    if cfg.generator == "smooth":
        return SmoothGrid((b, 1, cfg.coarse_size, cfg.coarse_size), side, seed=seed,
                          start_keep=cfg.smooth_start)
    if cfg.generator == "unet":
        return MaskUNet(hm.in_chans, cfg.width, cfg.depth, cfg.out_stride, cfg.init_keep)
    raise CircuitlabError(f"unknown generator {cfg.generator!r}; use 'grid', 'smooth' or "
                          f"'unet'")


def explain_at_area(hm: HookedModel, x: torch.Tensor, area: float, *,
                    base: Optional[Explanation] = None, config: Optional[ExplainConfig] = None,
                    steps: Optional[int] = None, seed: int = 0, target=None,
                    progress: Optional[Callable[[int, dict], None]] = None) -> Explanation:
    """A mask keeping exactly ``area`` of the image (to the mask's cell), for comparisons at
    equal area: the minimal explanation ``base`` (run here with the default preset when not
    given) is pared down to the budget from its own keep probabilities, so the budget mask
    grows out of the evidence the free mask found instead of from a random start (more
    precise on the benchmark's tuning images: docs/results.md, "Design choices, measured").
    ``config``: the budget run's settings (default preset for the
    input size, with ``area_budget=area``); ``seconds`` includes the base run made here.
    """
    x = hm.check_input(x)
    if not 0 < area <= 1:
        raise CircuitlabError(f"area is the kept fraction, in (0, 1]; got {area}")
    t0 = time.perf_counter()
    if base is None:
        base = explain(hm, x, steps=steps, seed=seed, target=target)
    cfg = (config or preset("default", hm.family.name, min(x.shape[-2:]),
                            area_budget=float(area))).replace(area_budget=float(area),
                                                              generator="grid")
    side = min(cfg.mask_size, x.shape[-2], x.shape[-1])
    soft = base.soft.float()
    if soft.shape[-2:] != (side, side):   # a U-Net's or an amortized explainer's resolution
        soft = F.interpolate(soft, size=(side, side), mode="bilinear", align_corners=False)
    # keep probabilities of exactly 0 or 1 have no logit; 1e-3 leaves room to move
    logits = torch.logit(soft.clamp(1e-3, 1 - 1e-3)).to(x.device)
    ex = explain(hm, x, cfg, steps=steps, seed=seed, mask_net=MaskGrid.from_logits(logits),
                 target=base.target if target is None else target, progress=progress)
    ex.seconds = time.perf_counter() - t0
    return ex


def minimize(hm: HookedModel, x: torch.Tensor, ex: Explanation, *, confidence: float = 1.0,
             steps: int = 40, min_area: float = 0.005, seed: int = 0) -> Explanation:
    """``ex`` made as small as the decision allows, then certified.

    1. Area search with warm starts: from the mask's area a, the budget a / 2 is tried by
       ``explain_at_area`` grown out of the last accepted mask (``steps`` steps each, not a
       cold restart), and so on while accepted, down to ``min_area``. A budget is accepted
       when its mask keeps the top-1 label with p_target >= ``confidence`` x the image's
       (1: the explanation at least as sure as the image, as the paper reports its
       explanations; 0: the label alone, which on photos admits masks of 1 % at p 0.05).
    2. ``certify``: regions are pruned while the decision holds at that same floor (or at
       the accepted mask's own p_target when the search accepted nothing and it is lower),
       until every connected region is necessary alone.

    Minimal therefore means: no smaller budget of the halving sequence was found to hold,
    and no single connected region can be deleted; not that no smaller mask exists.
    ``search`` lists per image the budgets tried: area, kept, confidence_ratio.
    """
    if not 0 <= confidence < float("inf"):
        raise CircuitlabError(f"confidence is a ratio to the image's p_target, >= 0; got "
                              f"{confidence}")
    x = hm.check_input(x)
    t0 = time.perf_counter()
    with torch.no_grad():
        p_x = hm(x).softmax(-1).gather(1, ex.target[:, None].to(x.device)).squeeze(1).cpu()
    masks, softs, floors, trails = [], [], [], []
    for i in range(x.shape[0]):
        xi, ti = x[i:i + 1], ex.target[i:i + 1]
        floor = confidence * float(p_x[i])
        mask, soft, p_mask, trail = _halve_while_held(
            hm, xi, ex.mask[i:i + 1], ex.soft[i:i + 1], ti, floor, float(p_x[i]), steps,
            min_area, seed)
        masks.append(mask)
        softs.append(F.interpolate(soft.float(), size=x.shape[-2:], mode="bilinear",
                                   align_corners=False))
        floors.append(min(floor, p_mask))
        trails.append(trail)
    certificates = certify(hm, x, torch.cat(masks).to(x.device), ex.target,
                           floor=torch.tensor(floors))
    mask = torch.cat([c.mask for c in certificates]).to(x.device)
    return Explanation(mask=mask, soft=torch.cat(softs), explanation=mask * x,
                       target=ex.target, history=ex.history, steps=ex.steps,
                       seconds=ex.seconds + time.perf_counter() - t0, config=ex.config,
                       found=ex.found, certificates=certificates, search=trails)


def _halve_while_held(hm, x, mask, soft, target, floor, p_image, steps, min_area, seed):
    """One image's area search: (mask, soft, its p_target, the budgets tried)."""
    p_mask = float(masked_predictions(hm, x, mask.to(x.device), int(target))[0][0])
    area, trail = float(mask.mean()), []
    while area / 2 >= min_area:
        cfg = preset("default", hm.family.name, min(x.shape[-2:]), area_budget=area / 2)
        cfg = cfg.replace(steps=steps, min_steps=0, budget_warmup=0.3)
        base = Explanation(mask=mask, soft=soft, explanation=mask * x, target=target,
                           history=pd.DataFrame(), steps=0, seconds=0.0, config=cfg)
        cand = explain_at_area(hm, x, area / 2, base=base, config=cfg, seed=seed)
        p, kept = masked_predictions(hm, x, cand.mask, int(target))
        held = bool(kept[0]) and float(p[0]) >= floor
        trail.append({"area": float(cand.area[0]), "kept": bool(kept[0]),
                      "confidence_ratio": float(p[0]) / p_image, "accepted": held})
        if not held:
            break
        mask, soft, p_mask, area = cand.mask, cand.soft, float(p[0]), area / 2
    return mask, soft, p_mask, trail


def _converged(rows, cfg: ExplainConfig) -> bool:
    last = rows[-cfg.patience:]
    if len(last) < cfg.patience:
        return False
    binary = last[-1]["bin"] < 0.01
    kept = all(r["kept"] == 1.0 for r in last)
    flat = last[0]["area"] - last[-1]["area"] < 0.002
    return binary and kept and flat
