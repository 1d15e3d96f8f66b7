"""Per-image explanations: train a mask generator on one image against the frozen classifier.

>>> ex = explain(hm, x)                      # default preset for the model's family
>>> ex.mask.shape, ex.area, ex.history.tail()
"""
from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Callable, Optional, Sequence, Union

import pandas as pd
import torch
import torch.nn.functional as F

from ..backgrounds import fill_generator, gaussian_blur
from ..deprecations import renamed
from ..errors import CircuitlabError
from ..execution import Execution
from ..hooked_model import HookedModel
from .best import BestMasks
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
    stopped: Optional[torch.Tensor] = None  # per image: the step its optimisation stopped at
    scoring: Optional[str] = None          # the region search: how its sets were scored,
    #                                        "compiled" (the AOT package) or "eager"

    @property
    def area(self) -> torch.Tensor:
        return self.mask.flatten(1).mean(1)

    def row(self, i: int) -> "Explanation":
        """Image ``i`` alone, as a batch of one."""
        def one(v):
            return v[i:i + 1] if isinstance(v, torch.Tensor) else \
                [v[i]] if isinstance(v, list) else v
        return Explanation(**{f.name: one(getattr(self, f.name)) for f in fields(self)})

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
            progress: Optional[Callable[[int, dict], None]] = None,
            budgets: Optional[Sequence[float]] = None,
            execution: Optional[Execution] = None) -> Explanation:
    """Minimal mask for each image of ``x`` (B, C, H, W), trained from scratch (per-image mode).

    ``mask_net``: a mask network to train instead of the one ``config.generator`` names
    (``generator=`` is its old name, kept for one release). ``target``: the class (or one per
    image) whose decision to explain; default the model's top-1 on each image. ``minimal``: the
    mask then goes through ``minimize`` (the smallest area budget at which the decision holds
    at ``confidence`` times the image's p_target, then pruned region by region and
    certified); ``search`` and ``certificates`` say how. The global torch RNG is left as it
    was. ``execution``: how the classifier runs in the loop (``readers.Execution``: bf16,
    ``torch.compile``, channels-last; default ``config``'s, fp32 eager); the area search
    runs the same way, its checks and the certificate in the model's own precision.

    Early stop, per image (after ``min_steps``): once its mask is binary, keeps the label and
    has not shrunk for ``patience`` steps, the image leaves the batch (``stopped`` says when).
    Each image's mask starts from the same draw of ``seed``, draws its own noise backgrounds
    and gets the gradient of its own loss, so with the grid mask networks an image's mask does
    not depend on the batch it is explained in, up to float rounding (batched convolutions
    round differently; docs/results.md measures it). A U-Net is one network shared by the
    batch. Per image, the smallest label-keeping mask seen is
    returned, preferring masks whose complement loses the label; an image for which no step
    kept the label gets the whole image (mask of ones).

    With ``config.area_budget`` every mask keeps exactly that fraction of its cells once the
    warm-up is over (``budgets``: one fraction per image instead); per image the returned
    mask is the one of those steps that kept the label with the highest target probability,
    or failing that, the highest target probability (``Explanation.found`` says which); no
    early stop.
    """
    x = hm.check_input(x)
    cfg = config or preset(preset_name, hm.family.name, min(x.shape[-2:]))
    if minimal and cfg.area_budget is not None:
        raise CircuitlabError("minimal=True searches the area itself; drop area_budget")
    if steps is not None:
        cfg = cfg.replace(steps=int(steps), min_steps=min(cfg.min_steps, int(steps)))
    if execution is not None:
        cfg = cfg.with_execution(execution)
    # the caller's global RNG is left as it was; a U-Net's initial weights come from ``seed``
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed)
        ex = _optimise(hm, x, cfg, seed, mask_net, target, progress, budgets)
    return minimize(hm, x, ex, confidence=confidence, seed=seed) if minimal else ex


def _optimise(hm, x, cfg: ExplainConfig, seed: int, mask_net, target, progress,
              budgets=None) -> Explanation:
    """The optimisation loop of ``explain``: the images of x leave it one by one as they
    converge, so a batch costs what its unfinished images cost."""
    b = x.shape[0]
    net = mask_net if mask_net is not None else _mask_net(hm, x, cfg, seed)
    net = net.to(x.device).train()
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    # only the U-Net looks at the image; the grid ignores its input
    x_gen = F.avg_pool2d(x, cfg.input_scale) if cfg.generator == "unet" and \
        cfg.input_scale > 1 else x
    # one generator per image: its noise backgrounds do not depend on the batch
    objective = Objective(hm, x, cfg, [fill_generator(seed, "objective") for _ in range(b)],
                          target, budgets)
    best = BestMasks(objective, x.shape[-2:], cfg.area_budget is not None)
    rows, active, step, t0 = [], list(range(b)), 0, time.perf_counter()
    for step in range(1, cfg.steps + 1):
        idx = torch.tensor(active, device=x.device)
        p = torch.sigmoid(net(x_gen))[idx]                          # (active, 1, h, w)
        loss, terms, out = objective(p, step, rows=active)
        opt.zero_grad(set_to_none=True)
        # the terms are means over the active images: scaled back to a sum, each image's
        # gradient is that of its own loss, whichever batch it is in
        (loss * len(active)).backward()
        opt.step()
        row = {"step": step, "loss": float(loss.detach()),
               **{n: float(v.detach()) for n, v in terms.items()},
               **best.update(active, step, p.detach(), out), "images": len(active)}
        rows.append(row)
        if progress:
            progress(step, row)
        # under a budget every step may still raise the confidence: no early stop
        if not best.budget and step >= cfg.min_steps:
            active = [i for i in active if not best.converged(i, cfg)]
            if not active:
                break
    mask = best.mask.to(x.device)
    return Explanation(mask=mask, soft=best.soft, explanation=mask * x, target=objective.target,
                       history=pd.DataFrame(rows), steps=step,
                       seconds=time.perf_counter() - t0, config=cfg,
                       found=best.kept if best.budget else torch.isfinite(best.area),
                       stopped=best.stopped)


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


def explain_at_area(hm: HookedModel, x: torch.Tensor, area: Union[float, Sequence[float]], *,
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
    ``area`` may be one fraction per image (each image keeps its own).
    """
    x = hm.check_input(x)
    areas = [float(area)] if isinstance(area, (int, float)) else [float(a) for a in area]
    if not all(0 < a <= 1 for a in areas) or len(areas) not in (1, x.shape[0]):
        raise CircuitlabError(f"area is the kept fraction, in (0, 1], one for all images or "
                              f"one per image; got {area}")
    t0 = time.perf_counter()
    if base is None:
        base = explain(hm, x, steps=steps, seed=seed, target=target,
                       execution=config.execution if config else None)
    # the budget run runs the model as the base run did, unless its config says otherwise
    cfg = (config or preset("default", hm.family.name, min(x.shape[-2:]), area_budget=areas[0])
           .with_execution(base.config.execution)).replace(area_budget=areas[0],
                                                          generator="grid")
    side = min(cfg.mask_size, x.shape[-2], x.shape[-1])
    soft = base.soft.float()
    if soft.shape[-2:] != (side, side):   # a U-Net's or an amortized explainer's resolution
        soft = F.interpolate(soft, size=(side, side), mode="bilinear", align_corners=False)
    # keep probabilities of exactly 0 or 1 have no logit; 1e-3 leaves room to move
    logits = torch.logit(soft.clamp(1e-3, 1 - 1e-3)).to(x.device)
    # a sequence of areas: one budget per image (a single one is every image's)
    budgets = None if isinstance(area, (int, float)) else \
        areas * x.shape[0] if len(areas) == 1 else areas
    ex = explain(hm, x, cfg, steps=steps, seed=seed, mask_net=MaskGrid.from_logits(logits),
                 target=base.target if target is None else target, progress=progress,
                 budgets=budgets)
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
    ``search`` lists per image the budgets tried: area, kept, confidence_ratio. The images
    of a batch halve in the same rounds (each at its own budget), so a batch costs rounds,
    not images x rounds; each image's search is the one it gets alone.
    """
    if not 0 <= confidence < float("inf"):
        raise CircuitlabError(f"confidence is a ratio to the image's p_target, >= 0; got "
                              f"{confidence}")
    x = hm.check_input(x)
    t0 = time.perf_counter()
    with torch.no_grad():
        p_x = hm(x).softmax(-1).gather(1, ex.target[:, None].to(x.device)).squeeze(1).cpu()
    search = _AreaSearch(hm, x, ex, [confidence * float(p) for p in p_x], p_x.tolist(),
                         steps, min_area, seed)
    search.run()
    certificates = certify(hm, x, torch.cat(search.masks).to(x.device), ex.target,
                           floor=torch.tensor(search.floors()))
    mask = torch.cat([c.mask for c in certificates]).to(x.device)
    softs = [F.interpolate(s.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)
             for s in search.softs]
    return Explanation(mask=mask, soft=torch.cat(softs), explanation=mask * x,
                       target=ex.target, history=ex.history, steps=ex.steps,
                       seconds=ex.seconds + time.perf_counter() - t0, config=ex.config,
                       found=ex.found, certificates=certificates, search=search.trails,
                       stopped=ex.stopped)


class _AreaSearch:
    """The halving search of every image of a batch at once: each round, the images whose
    last halving held try half their area together (``explain_at_area`` with one budget per
    image), so a batch costs rounds, not images x rounds; each image's trail is the one it
    gets alone."""

    def __init__(self, hm, x, ex: Explanation, floors: list, p_images: list, steps: int,
                 min_area: float, seed: int):
        self.hm, self.x, self.targets = hm, x, ex.target
        self.execution = ex.config.execution
        self.floor, self.p_image = floors, p_images
        self.steps, self.min_area, self.seed = steps, min_area, seed
        b = x.shape[0]
        self.masks = [ex.mask[i:i + 1] for i in range(b)]
        self.softs = [ex.soft[i:i + 1] for i in range(b)]
        self.area = [float(m.mean()) for m in self.masks]
        self.p_mask = [float(masked_predictions(hm, x[i:i + 1], self.masks[i].to(x.device),
                                                int(self.targets[i]))[0][0]) for i in range(b)]
        self.trails = [[] for _ in range(b)]

    def floors(self) -> list:
        """What certify holds each image to: its floor, or its accepted mask's own p_target
        when the search accepted nothing and that is lower."""
        return [min(f, p) for f, p in zip(self.floor, self.p_mask)]

    def run(self) -> None:
        active = [i for i, a in enumerate(self.area) if a / 2 >= self.min_area]
        while active:
            active = self._round(active)

    def _round(self, idx: list) -> list:
        hm, x = self.hm, self.x
        budgets = [self.area[i] / 2 for i in idx]
        cfg = preset("default", hm.family.name, min(x.shape[-2:]), area_budget=budgets[0])
        cfg = cfg.replace(steps=self.steps, min_steps=0, budget_warmup=0.3).with_execution(
            self.execution)
        rows = torch.tensor(idx)
        xs, masks = x[rows.to(x.device)], torch.cat([self.masks[i] for i in idx])
        base = Explanation(mask=masks, soft=torch.cat([self.softs[i] for i in idx]),
                           explanation=masks.to(x.device) * xs,
                           target=self.targets[rows.to(self.targets.device)],
                           history=pd.DataFrame(), steps=0, seconds=0.0, config=cfg)
        cand = explain_at_area(hm, xs, budgets, base=base, config=cfg, seed=self.seed)
        held_next = []
        for j, i in enumerate(idx):
            p, kept = masked_predictions(hm, x[i:i + 1], cand.mask[j:j + 1],
                                         int(self.targets[i]))
            held = bool(kept[0]) and float(p[0]) >= self.floor[i]
            self.trails[i].append({"area": float(cand.area[j]), "kept": bool(kept[0]),
                                   "confidence_ratio": float(p[0]) / self.p_image[i],
                                   "accepted": held})
            if held:
                self.masks[i], self.softs[i] = cand.mask[j:j + 1], cand.soft[j:j + 1]
                self.p_mask[i], self.area[i] = float(p[0]), self.area[i] / 2
                if self.area[i] / 2 >= self.min_area:
                    held_next.append(i)
        return held_next
