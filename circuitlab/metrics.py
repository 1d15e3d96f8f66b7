"""Metrics for masks and saliency maps, batched over images. Each returns one value per image.

Conventions: ``x`` is a batch (B, C, H, W) in the model's normalised space, where 0 is the
dataset mean (a "deleted" pixel); masks and saliency maps are (B, 1, h, w) or (B, h, w) at any
resolution and are resized to the input; ``target`` defaults to the model's top-1 on ``x``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .backgrounds import KINDS, fill_generator, gaussian_blur, make_backgrounds
from .errors import CircuitlabError
from .hooked_model import HookedModel
from .kernels.reference import activation_distance


def _as_map(m: torch.Tensor, size, mode: str = "nearest") -> torch.Tensor:
    if m.dim() == 3:
        m = m[:, None]
    if m.dim() != 4 or m.shape[1] != 1:
        raise CircuitlabError(f"expected masks (B, 1, h, w) or (B, h, w), got {tuple(m.shape)}")
    m = m.float()
    if tuple(m.shape[-2:]) != tuple(size):
        m = F.interpolate(m, size=tuple(size), mode=mode,
                          **({} if mode == "nearest" else {"align_corners": False}))
    return m


@torch.no_grad()
def _probs(hm: HookedModel, images: torch.Tensor, target: torch.Tensor,
           batch_size: int = 64) -> torch.Tensor:
    """p_target for each row of ``images``; ``target`` has one class per row."""
    out = []
    for i in range(0, images.shape[0], batch_size):
        p = hm(images[i:i + batch_size]).softmax(-1)
        out.append(p.gather(1, target[i:i + batch_size, None].to(p.device)).squeeze(1))
    return torch.cat(out).cpu()


def target_classes(hm: HookedModel, x: torch.Tensor, target=None) -> torch.Tensor:
    """One class per image of ``x`` (on the CPU): ``target`` (a class, or one per image)
    broadcast over the batch, or the model's top-1 on each image when it is None."""
    if target is not None:
        return torch.as_tensor(target).reshape(-1).expand(x.shape[0]).long().cpu()
    with torch.no_grad():
        return hm(x).argmax(-1).cpu()


def area_fraction(mask: torch.Tensor) -> torch.Tensor:
    """Fraction of kept pixels: mean of the (binary) mask."""
    return (mask.flatten(1).float().mean(1)).cpu()


def binarize_at_area(saliency: torch.Tensor, area: float) -> torch.Tensor:
    """Keep the top ``area`` fraction of each saliency map (ties broken by position)."""
    s = saliency.flatten(1)
    k = max(1, int(round(area * s.shape[1])))
    idx = s.argsort(dim=1, descending=True, stable=True)[:, :k]
    out = torch.zeros_like(s)
    out.scatter_(1, idx, 1.0)
    return out.view_as(saliency)


@torch.no_grad()
def evaluate_mask(hm: HookedModel, x: torch.Tensor, mask: torch.Tensor, target=None, *,
                  backgrounds: Sequence[str] = KINDS, n_random: int = 4,
                  seed: int = 0) -> dict:
    """The standard numbers for binary masks, one tensor of B values each.

    - ``area_fraction``: kept pixels / all pixels.
    - ``top1_kept``: argmax f(m x) equals the target.
    - ``confidence_image``, ``confidence_explanation``: p_target on x and on m x.
    - ``kl``: KL(p_x || p_e) over all classes.
    - ``sufficiency``: fraction of filled-in backgrounds r (grey, ``n_random`` gaussian and
      uniform draws, blur) for which argmax f(m x + (1 - m) r) is still the target.
    - ``necessity_drop``: 1 - p_target((1 - m) x) / p_target(x), the relative drop when only
      the complement is shown (1 = the complement carries no evidence).
    - ``confidence_ratio``: p_target(m x) / p_target(x) (above 1: the explanation is surer).
    - ``kept_<fill>``: per fill of ``backgrounds``, the share of its draws under which top-1
      stays (grey and blur: one draw, 0 or 1).
    - ``regions``, ``top_regions_share``: see ``regions``.
    """
    x = hm.check_input(x)
    b = x.shape[0]
    m = _as_map(mask, x.shape[-2:]).to(x.device)
    y = target_classes(hm, x, target)
    lx, le = hm(x), hm(m * x)
    px, pe = lx.softmax(-1).cpu(), le.softmax(-1).cpu()
    conf_x, conf_e = px.gather(1, y[:, None]).squeeze(1), pe.gather(1, y[:, None]).squeeze(1)
    kl = (px * (px.clamp_min(1e-12).log() - pe.clamp_min(1e-12).log())).sum(1)
    g = fill_generator(seed, "metrics")
    kinds = [k for k in backgrounds if k in ("grey", "blur")]
    kinds += [k for k in backgrounds if k in ("gaussian", "uniform")] * n_random
    r = make_backgrounds(x, hm.data_config, kinds, g)                 # (K * B, ...)
    k = len(kinds)
    filled = m.repeat(k, 1, 1, 1) * x.repeat(k, 1, 1, 1) + (1 - m.repeat(k, 1, 1, 1)) * r
    pred = torch.cat([hm(filled[i:i + 64]).argmax(-1).cpu() for i in range(0, k * b, 64)])
    hits = (pred.view(k, b) == y[None]).float()
    sufficiency = hits.mean(0)
    conf_c = _probs(hm, (1 - m) * x, y)
    per_fill = {f"kept_{kind}": hits[[i for i, c in enumerate(kinds) if c == kind]].mean(0)
                for kind in dict.fromkeys(kinds)}
    return {
        "area_fraction": area_fraction(m),
        "top1_kept": (pe.argmax(1) == y),
        "label": y,
        "confidence_image": conf_x,
        "confidence_explanation": conf_e,
        "kl": kl,
        "sufficiency": sufficiency,
        "necessity_drop": 1 - conf_c / conf_x.clamp_min(1e-12),
        "confidence_ratio": conf_e / conf_x.clamp_min(1e-12),
        **per_fill,
        **regions(m),
    }


STRUCTURE_8 = np.ones((3, 3), dtype=bool)   # 8-connectivity: diagonal neighbours join


def regions(mask: torch.Tensor, top: int = 5) -> dict:
    """How a binary mask reads: ``regions``, its connected regions (8-connectivity), and
    ``top_regions_share``, the share of its kept pixels in the ``top`` largest (1 for an
    empty mask). A mask a person can read is a few regions holding nearly all of it."""
    m = _as_map(mask, mask.shape[-2:]).cpu().numpy() > 0.5
    count, share = [], []
    for img in m[:, 0]:
        labels, n = ndimage.label(img, structure=STRUCTURE_8)
        sizes = np.sort(np.bincount(labels.ravel())[1:])[::-1]
        count.append(n)
        share.append(float(sizes[:top].sum() / sizes.sum()) if n else 1.0)
    return {"regions": torch.tensor(count), "top_regions_share": torch.tensor(share)}


@torch.no_grad()
def activation_similarity(hm: HookedModel, x: torch.Tensor, e: torch.Tensor,
                          names: Optional[Sequence[str]] = None) -> dict:
    """Per tap (default: the family's taps), how close the explanation's activations
    phi(e) are to the image's phi(x): ``cosine`` (mean over positions of the cosine across
    channels, 1 = same direction everywhere) and ``zmse`` (MSE of the per-channel z-scored
    maps: 0 = same pattern). {tap: {"cosine": (B,), "zmse": (B,)}}."""
    names = list(names or hm.taps)
    if not names:
        raise CircuitlabError(f"{hm.name} has no default taps; pass the hook names to compare")
    _, ca = hm.run_with_cache(x, names=names)
    _, ce = hm.run_with_cache(e, names=names)
    out = {}
    for n in names:
        axis = hm.point(n).unit_axis
        pairs = [(ca[n][i:i + 1], ce[n][i:i + 1]) for i in range(x.shape[0])]
        out[n] = {"cosine": torch.stack([1 - activation_distance(a, b, "cosine", axis)
                                         for a, b in pairs]).cpu(),
                  "zmse": torch.stack([activation_distance(a, b, "zmse", axis)
                                       for a, b in pairs]).cpu()}
    return out


@torch.no_grad()
def _auc_curve(hm, x, saliency, target, steps, insert: bool, batch_size: int, seed: int,
               canvas: str = "blur"):
    x = hm.check_input(x)
    b, _, h, w = x.shape
    y = target_classes(hm, x, target)
    s = _as_map(saliency, (h, w), mode="bilinear").flatten(1).cpu()
    g = torch.Generator().manual_seed(seed)
    s = s + 1e-6 * s.abs().max().clamp_min(1e-12) * torch.rand(s.shape, generator=g)  # ties
    order = s.argsort(dim=1, descending=True)
    n = h * w
    ks = torch.linspace(0, n, steps + 1).round().long()
    if canvas not in ("blur", "grey"):
        raise CircuitlabError(f"canvas must be 'blur' or 'grey', got {canvas!r}")
    canvas = gaussian_blur(x, sigma=max(1.0, min(h, w) / 20)) if insert and canvas == "blur" \
        else torch.zeros_like(x)
    curves = torch.zeros(b, steps + 1)
    for i in range(b):
        rank = torch.empty(n, dtype=torch.long)
        rank[order[i]] = torch.arange(n)
        # row j shows the top ks[j] pixels of x (insertion) or hides them (deletion)
        top = (rank[None, :] < ks[:, None]).float().view(steps + 1, 1, h, w).to(x.device)
        keep = top if insert else 1 - top
        imgs = keep * x[i:i + 1] + (1 - keep) * canvas[i:i + 1]
        curves[i] = _probs(hm, imgs, y[i].repeat(steps + 1), batch_size)
    # trapezoid rule over the fraction of pixels moved, [0, 1]
    auc = (curves[:, 1:] + curves[:, :-1]).sum(1) / (2 * steps)
    return auc, curves


def deletion_auc(hm: HookedModel, x: torch.Tensor, saliency: torch.Tensor, target=None,
                 steps: int = 20, batch_size: int = 64, seed: int = 0) -> torch.Tensor:
    """Area under p_target as the most salient pixels are deleted first (set to the mean);
    lower is better (Petsiuk et al. 2018)."""
    return _auc_curve(hm, x, saliency, target, steps, False, batch_size, seed)[0]


def insertion_auc(hm: HookedModel, x: torch.Tensor, saliency: torch.Tensor, target=None,
                  steps: int = 20, batch_size: int = 64, seed: int = 0,
                  canvas: str = "blur") -> torch.Tensor:
    """Area under p_target as the most salient pixels are inserted first into a blurred copy
    of the image (``canvas="grey"``: into the mean image); higher is better."""
    return _auc_curve(hm, x, saliency, target, steps, True, batch_size, seed, canvas)[0]


def pointing_game(saliency: torch.Tensor, gt: torch.Tensor,
                  tolerance: int = 0) -> torch.Tensor:
    """Hit when the saliency maximum falls on the ground-truth mask (dilated by ``tolerance``
    pixels, Zhang et al. 2018 use 15 at 224 px)."""
    g = _as_map(gt, gt.shape[-2:]).cpu()
    s = _as_map(saliency, g.shape[-2:], mode="bilinear").cpu()
    if tolerance:
        g = F.max_pool2d(g, 2 * tolerance + 1, stride=1, padding=tolerance)
    idx = s.flatten(1).argmax(1)
    return g.flatten(1).gather(1, idx[:, None]).squeeze(1) > 0.5


def iou(mask: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """|mask ∩ gt| / |mask ∪ gt| for binary masks."""
    g = _as_map(gt, gt.shape[-2:]).cpu() > 0.5
    m = _as_map(mask, g.shape[-2:]).cpu() > 0.5
    inter = (m & g).flatten(1).sum(1).float()
    union = (m | g).flatten(1).sum(1).float()
    return inter / union.clamp_min(1)


def mask_precision(mask: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Fraction of the kept pixels that lie on the ground-truth object."""
    g = _as_map(gt, gt.shape[-2:]).cpu() > 0.5
    m = _as_map(mask, g.shape[-2:]).cpu() > 0.5
    return (m & g).flatten(1).sum(1).float() / m.flatten(1).sum(1).float().clamp_min(1)


def mask_report(hm: HookedModel, x: torch.Tensor, mask: torch.Tensor, ranking: torch.Tensor,
                target=None, seed: int = 0) -> dict:
    """Every number of ``evaluate_mask``, deletion / insertion AUC along ``ranking`` (the
    mask itself, or the saliency map it was cut from) and ``activation_similarity``, for one
    image (1, C, H, W), as plain Python values: what ``metrics.json`` of the explain and
    saliency commands holds, so a mask of any method reads the same."""
    r = evaluate_mask(hm, x, mask, target, seed=seed)
    y = int(r["label"][0])
    fills = [k for k in r if k.startswith("kept_")]
    similarity = activation_similarity(hm, x, mask.to(x.device) * x) if hm.taps else {}
    return {
        "area_fraction": float(r["area_fraction"][0]), "top1_kept": bool(r["top1_kept"][0]),
        "label": hm.label(y), "class_index": y,
        "confidence_image": float(r["confidence_image"][0]),
        "confidence_explanation": float(r["confidence_explanation"][0]),
        "confidence_ratio": float(r["confidence_ratio"][0]),
        "regions": int(r["regions"][0]),
        "top_regions_share": float(r["top_regions_share"][0]),
        "sufficiency": float(r["sufficiency"][0]),
        "top1_kept_under_fill": {k[len("kept_"):]: float(r[k][0]) for k in fills},
        "necessity_drop": float(r["necessity_drop"][0]),
        "deletion_auc": float(deletion_auc(hm, x, ranking, y, seed=seed)[0]),
        "insertion_auc": float(insertion_auc(hm, x, ranking, y, seed=seed)[0]),
        "activation_similarity": {tap: {k: float(v[0]) for k, v in d.items()}
                                  for tap, d in similarity.items()},
    }
