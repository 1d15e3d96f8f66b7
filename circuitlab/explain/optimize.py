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

from ..errors import CircuitlabError
from ..hooked_model import HookedModel
from . import losses
from .backgrounds import make_backgrounds
from .config import ExplainConfig, default_alphas, default_distances, preset
from .generator import MaskGrid, MaskUNet, binarize_ste


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

    @property
    def area(self) -> torch.Tensor:
        return self.mask.flatten(1).mean(1)


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
    kinds = tuple(cfg.distances) if cfg.distances else default_distances(len(names),
                                                                         hm.family.name)
    if len(alphas) != len(names) or len(kinds) != len(names):
        raise CircuitlabError(f"{len(names)} taps need as many alphas and distances, got "
                              f"{len(alphas)} and {len(kinds)}")
    for k in kinds:
        if k not in losses.DISTANCES:
            raise CircuitlabError(f"unknown distance {k!r}; use one of {losses.DISTANCES}")
    return points, alphas, kinds, tuple(p.unit_axis for p in points)


def explain(hm: HookedModel, x: torch.Tensor, config: Optional[ExplainConfig] = None, *,
            preset_name: str = "default", steps: Optional[int] = None, seed: int = 0,
            generator: Optional[torch.nn.Module] = None,
            progress: Optional[Callable[[int, dict], None]] = None) -> Explanation:
    """Minimal mask for each image of ``x`` (B, C, H, W), trained from scratch (per-image mode).

    Early stop (after ``min_steps``) once the mask is binary, the label is kept and the area has
    not shrunk for ``patience`` steps. Per image, the smallest label-keeping mask seen is
    returned, preferring masks whose complement loses the label; an image for which no step
    kept the label gets the whole image (mask of ones).
    """
    cfg = config or preset(preset_name, hm.family.name, min(x.shape[-2:]))
    if steps is not None:
        cfg = cfg.replace(steps=int(steps), min_steps=min(cfg.min_steps, int(steps)))
    x = hm.check_input(x)
    b = x.shape[0]
    points, alphas, kinds, cdims = resolve_taps(hm, cfg)
    names = [p.name for p in points]
    torch.manual_seed(seed)
    gen_rng = torch.Generator().manual_seed(seed)
    if generator is not None:
        net = generator
    elif cfg.generator == "grid":
        side = min(cfg.mask_size, x.shape[-2], x.shape[-1])
        net = MaskGrid((b, 1, side, side), seed=seed)
    elif cfg.generator == "unet":
        net = MaskUNet(hm.in_chans, cfg.width, cfg.depth, cfg.out_stride, cfg.init_keep)
    else:
        raise CircuitlabError(f"unknown generator {cfg.generator!r}; use 'grid' or 'unet'")
    net = net.to(x.device).train()
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)

    # only the U-Net looks at the image; the grid ignores its input
    x_gen = F.avg_pool2d(x, cfg.input_scale) if cfg.generator == "unet" and \
        cfg.input_scale > 1 else x
    with torch.no_grad():
        logits_x, cache_x = hm.run_with_cache(x, names=names)
    target = logits_x.argmax(-1)
    p_x = logits_x.softmax(-1).gather(1, target[:, None]).squeeze(1)
    acts_x = [cache_x[n] for n in names]
    backgrounds = make_backgrounds(x, hm.data_config, cfg.backgrounds, gen_rng)
    nb = len(cfg.backgrounds)

    rows, best_area = [], torch.full((b,), float("inf"))
    best_nec = torch.zeros(b, dtype=torch.bool)
    best_mask = torch.ones(b, 1, *x.shape[-2:])
    best_soft = None
    t0 = time.perf_counter()
    step = 0
    for step in range(1, cfg.steps + 1):
        p = torch.sigmoid(net(x_gen))                               # (B, 1, h, w)
        m_low = binarize_ste(p)
        m = F.interpolate(m_low, size=x.shape[-2:], mode="nearest")
        e = m * x
        parts = [e]
        k = min(cfg.backgrounds_per_step, nb) if cfg.rob else 0
        if k:
            pick = torch.randperm(nb, generator=gen_rng)[:k]
            r = backgrounds.view(nb, b, *x.shape[1:])[pick].reshape(k * b, *x.shape[1:])
            parts.append(m.repeat(k, 1, 1, 1) * x.repeat(k, 1, 1, 1) +
                         (1 - m.repeat(k, 1, 1, 1)) * r)
        if cfg.nec:
            parts.append((1 - m) * x)
        logits, cache = hm.run_with_cache(torch.cat(parts), names=names)
        logits_e = logits[:b]
        terms = {
            "act": losses.activation_matching(acts_x, [cache[n][:b] for n in names], alphas,
                                              kinds, cdims),
            "ce": losses.class_ce(logits_e, target),
            "kl": losses.logit_kl(logits_x, logits_e, cfg.temperature),
            "area": losses.area(p) if cfg.area_mode == "mean" else losses.area_rank(
                p, cfg.area_start * (cfg.area_end / cfg.area_start) ** (
                    (step - 1) / max(1, cfg.steps - 1))),
            "bin": losses.binarization(p),
            "tv": losses.total_variation(p, cfg.tv_neighbours),
        }
        if k:
            terms["rob"] = losses.class_ce(logits[b:b + k * b], target.repeat(k))
        if cfg.nec:
            terms["nec"] = losses.necessity_hinge(logits_x, logits[-b:], target,
                                                  cfg.necessity_mode, cfg.necessity_margin)
        loss = sum(getattr(cfg, name) * value for name, value in terms.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

        with torch.no_grad():
            kept = logits_e.argmax(-1) == target
            hard_area = m_low.flatten(1).mean(1).cpu()
            nec_ok = torch.ones(b, dtype=torch.bool)
            if cfg.nec:
                pc = logits[-b:].softmax(-1).gather(1, target[:, None]).squeeze(1)
                nec_ok = (pc <= (1 - cfg.necessity_margin) * p_x).cpu()
            # the smallest label-keeping mask, preferring ones whose complement loses the label
            better = kept.cpu() & ((nec_ok & ~best_nec) |
                                   ((nec_ok == best_nec) & (hard_area < best_area)))
            if best_soft is None:  # rows that never keep the label keep the whole image
                best_soft = torch.ones_like(p, device="cpu")
            if better.any():
                best_area = torch.where(better, hard_area, best_area)
                best_nec = best_nec | (better & nec_ok)
                best_mask[better] = m[better].detach().cpu()
                best_soft[better] = p[better].detach().cpu()
        row = {"step": step, "loss": float(loss.detach()),
               **{n: float(v.detach()) for n, v in terms.items()},
               "area": float(hard_area.mean()), "kept": float(kept.float().mean())}
        rows.append(row)
        if progress:
            progress(step, row)
        if step >= cfg.min_steps and _converged(rows, cfg):
            break
    mask = best_mask.to(x.device)
    history = pd.DataFrame(rows)
    return Explanation(mask=mask, soft=best_soft, explanation=mask * x, target=target,
                       history=history, steps=step, seconds=time.perf_counter() - t0,
                       config=cfg)


def _converged(rows, cfg: ExplainConfig) -> bool:
    last = rows[-cfg.patience:]
    if len(last) < cfg.patience:
        return False
    binary = last[-1]["bin"] < 0.01
    kept = all(r["kept"] == 1.0 for r in last)
    flat = last[0]["area"] - last[-1]["area"] < 0.002
    return binary and kept and flat
