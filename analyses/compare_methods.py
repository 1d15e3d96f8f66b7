"""Every saliency method at equal area, on the ground-truth benchmark and on real photos.

    python analyses/compare_methods.py --out analyses/out/compare_methods   # ~1 h, 2 CPU cores
    python analyses/compare_methods.py --out /tmp/cm --quick                # ~1 min

Methods: ``ours`` (the per-image free explanation, default preset, ranked by its keep
probabilities), ``ours-minimal`` (that explanation through ``minimize``: the area search
and certified pruning of the CLI's default; its seconds include the free run),
``ours-area`` (the free explanation pared down to exactly each area by
``explain_at_area``; its seconds include the free run), ``ours-regions`` (``explain
--mode regions``: superpixels chosen greedily over the mean colour and noise, its own
search), Grad-CAM, Grad-CAM++, Integrated
Gradients (32 steps, mean baseline), RISE (2000 masks, 7x7 cells), extremal perturbations
(preserve, 800 steps, optimised for each area) and, on ViTs, attention rollout and CLS
attention. Each saliency map is binarised at the same area (5 % and 10 % of the pixels) and
scored on the same images:

- ``top1``: the masked image m x keeps the model's top-1; ``confidence``: p_target(m x);
  ``ratio``: that over p_target(x);
- ``sufficiency``: top-1 kept over filled-in backgrounds; ``grey`` / ``blur`` /
  ``gaussian`` / ``uniform``: top-1 kept with the rest filled so (share of draws);
  ``necessity``: relative drop of p_target when only the complement (1 - m) x is shown;
- ``regions``: connected regions of the mask (8-connectivity); ``top5``: the share of its
  kept pixels in the five largest;
- ``deletion`` / ``insertion``: AUC of p_target as pixels are removed (lower is better) or
  inserted into a blurred copy (higher is better) in saliency order (area-independent);
- synthetic only (the red object is the ground truth): ``pointing`` (the saliency maximum
  lies on the object), ``iou`` and ``precision`` (kept pixels on the object);
- ``seconds``: wall time per image of the method on this machine (batched methods divided).

Rows with ``area`` empty score ``ours``, ``ours-minimal`` and ``ours-regions`` at their own
area (the mask as the method returns it; ``kept_area`` holds it), not binarised at a shared
one.

Writes ``compare.csv`` (one row per image, method, area), ``compare.md`` (means) and
``examples_<model>.png`` (masks at 10 % for the first images).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pandas as pd
import torch

from circuitlab import baselines, metrics
from circuitlab.explain import explain, explain_at_area, explain_regions, minimize
from circuitlab.files import write_text

from _common import (PHOTOS, QUICK_STEPS, arguments, bad_models, fail, faded, gather, load,
                     parse_list, pyplot, save_figure, settings, show_image, start,
                     write_summary)

PROG = "analyses/compare_methods.py"
MODELS = ("synthetic-cnn", "synthetic-vit", "efficientnet_lite0")
AREAS = (0.05, 0.10)
OUTPUTS = ("compare.csv", "compare.md")
OURS = ("ours", "ours-minimal", "ours-area", "ours-regions")
PER_AREA = ("ours-area", "extremal")   # optimised for each area


def ours_at_area(hm, x, area: float, base=None, steps=None):
    """``explain_at_area``: the minimal explanation pared down to exactly ``area`` (optimised
    for that area, as extremal perturbations are), ranked like ``ours``
    (``Explanation.ranking``) so that binarising at ``area`` gives the budget mask itself.
    ``steps``: fewer than the preset's (the --quick runs)."""
    return explain_at_area(hm, x, area, base=base, steps=steps).ranking().cpu()


def saliencies(hm, x, quick: bool, areas, log, only=None):
    """({(method, area or None): (maps, seconds per image)}, {method: its own binary mask});
    area-free methods once."""
    kw = settings(quick)
    out, own = {}, {}
    steps = QUICK_STEPS if quick else None
    base = None   # the free explanation: ours-area pares it down (its time counted each area)
    for method in list(OURS) + baselines.methods_for(hm):
        if only and method not in only:
            continue
        for area in (areas if method in PER_AREA else (None,)):
            t = time.perf_counter()
            if method == "ours-regions":       # its own search, no free run under it
                ex = explain_regions(hm, x)
                s, own[method] = ex.ranking().cpu(), ex.mask.cpu()
            elif method in OURS:
                if base is None:
                    base = explain(hm, x, steps=steps)
                    base_sec = time.perf_counter() - t
                t = time.perf_counter() - base_sec   # the free run is part of each one's cost
                if method == "ours":
                    s, own[method] = base.ranking().cpu(), base.mask.cpu()
                elif method == "ours-minimal":
                    ex = minimize(hm, x, base, steps=steps or 40)
                    s, own[method] = ex.ranking().cpu(), ex.mask.cpu()
                else:
                    s = ours_at_area(hm, x, area, base=base, steps=steps)
            else:
                extra = dict(kw.get(method, {}), **({"area": area} if area else {}))
                # one image at a time for the fast methods: seconds per image is then what a
                # user waits; extremal and ours run the batch (they optimise per image anyway)
                s = baselines.saliency(hm, x, method, **extra) if method == "extremal" \
                    else torch.cat([baselines.saliency(hm, x[i:i + 1], method, **extra)
                                    for i in range(x.shape[0])])
            sec = (time.perf_counter() - t) / x.shape[0]
            out[(method, area)] = (s, sec)
            log(f"  {method}{f' @ {area:.2f}' if area else ''}: {sec:.2f} s / image")
    return out, own


FILLS = ("grey", "blur", "gaussian", "uniform")


def score(name, hm, x, gt, names, maps, own, areas, quick: bool):
    """One row per image, method and area (``None``: a method's own mask, from ``own``)."""
    rows = []
    steps = 10 if quick else 20
    y = hm(x).argmax(-1)
    auc = {}
    for (method, area), (s, sec) in maps.items():
        auc[(method, area)] = (metrics.deletion_auc(hm, x, s, y, steps=steps),
                               metrics.insertion_auc(hm, x, s, y, steps=steps))
    jobs = [(method, marea, area, baselines.binarize_at_area(s, area))
            for area in areas for (method, marea), (s, _) in maps.items()
            if marea in (None, area)]
    jobs += [(method, None, None, mask) for method, mask in own.items()]
    for method, marea, area, mask in jobs:
        s, sec = maps[(method, marea)]
        ev = metrics.evaluate_mask(hm, x, mask, y, n_random=2 if quick else 4)
        dele, ins = auc[(method, marea)]
        for i in range(x.shape[0]):
            row = {"model": name, "image": names[i], "method": method,
                   "area": float("nan") if area is None else area,
                   "kept_area": float(ev["area_fraction"][i]),
                   "top1": bool(ev["top1_kept"][i]),
                   "confidence": float(ev["confidence_explanation"][i]),
                   "confidence_image": float(ev["confidence_image"][i]),
                   "ratio": float(ev["confidence_ratio"][i]),
                   "sufficiency": float(ev["sufficiency"][i]),
                   **{f: float(ev[f"kept_{f}"][i]) for f in FILLS},
                   "necessity": float(ev["necessity_drop"][i]),
                   "regions": int(ev["regions"][i]),
                   "top5": float(ev["top_regions_share"][i]),
                   "deletion": float(dele[i]), "insertion": float(ins[i]),
                   "pointing": float("nan"), "iou": float("nan"),
                   "precision": float("nan"), "seconds": sec}
            if gt is not None:
                row["pointing"] = float(metrics.pointing_game(s[i:i + 1], gt[i:i + 1])[0])
                row["iou"] = float(metrics.iou(mask[i:i + 1], gt[i:i + 1])[0])
                row["precision"] = float(metrics.mask_precision(mask[i:i + 1],
                                                                gt[i:i + 1])[0])
            rows.append(row)
    return rows


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Means per model, area (``own``: each method's own mask) and method."""
    cols = [c for c in ("kept_area", "top1", "confidence", "ratio", "sufficiency") + FILLS +
            ("necessity", "regions", "top5", "deletion", "insertion", "pointing", "iou",
             "precision", "seconds") if c in df]     # an older CSV lacks the newer columns
    d = df.assign(top1=df["top1"].astype(float),
                  area=df["area"].map(lambda a: "own" if pd.isna(a) else f"{a:.2f}"))
    keys = ["model", "area", "method"]
    agg = d.groupby(keys, sort=False)[cols].mean()
    agg.insert(0, "images", d.groupby(keys, sort=False).size())
    agg = agg.reset_index()
    order = {m: i for i, m in enumerate(OURS + tuple(baselines.METHODS))}
    models = {m: i for i, m in enumerate(dict.fromkeys(MODELS + tuple(df["model"])))}
    agg = agg.assign(_m=agg["model"].map(models), _k=agg["method"].map(order))
    return agg.sort_values(["_m", "area", "_k"]).drop(columns=["_m", "_k"]).reset_index(
        drop=True)


def _rank(key):
    order = OURS + tuple(baselines.METHODS)
    return (order.index(key[0]), key[1] or 0.0)


def examples(hm, x, names, maps, area: float, path: Path, n: int = 4):
    plt = pyplot()
    keys = [k for k in maps if k[1] in (None, area)]
    n = min(n, x.shape[0])
    fig, axes = plt.subplots(n, len(keys) + 1, figsize=(1.6 * (len(keys) + 1), 1.7 * n),
                             squeeze=False)
    for i in range(n):
        img = show_image(x[i:i + 1], hm)
        axes[i][0].imshow(img)
        axes[i][0].set_title(names[i], fontsize=6)
        for j, key in enumerate(keys, 1):
            m = baselines.binarize_at_area(maps[key][0][i:i + 1], area)[0, 0].numpy()
            axes[i][j].imshow(faded(img, m))
            if i == 0:
                axes[i][j].set_title(key[0], fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"{hm.name}: the top {area:.0%} of each saliency map", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> int:
    p = arguments(__doc__, "synthetic CNN, 4 images, fewer samples per method", MODELS,
                  images_help=f"images per model (default 32 synthetic, {len(PHOTOS)} photos)",
                  gather="compare.md from --out/compare.csv")
    p.add_argument("--areas", default="0.05,0.1", help="comma-separated fractions")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset (" + ", ".join(OURS) + ", "
                        + ", ".join(baselines.METHODS) + ")")
    p.add_argument("--update", action="store_true",
                   help="rerun --methods on --models and replace only their rows of an "
                        "existing compare.csv")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.gather:
        return gather(PROG, out, "compare.csv", write_outputs)
    names = ["synthetic-cnn"] if args.quick else parse_list(args.models)
    try:
        areas = parse_list(args.areas, float)
    except ValueError:
        return fail(PROG, f"--areas takes fractions like 0.05,0.1, got {args.areas!r}")
    bad = bad_models(PROG, names, MODELS)
    if bad is not None:
        return bad
    if not areas or not all(0 < a < 1 for a in areas):
        return fail(PROG, "--areas must lie in (0, 1)")
    if args.images is not None and args.images < 1:
        return fail(PROG, "--images must be positive")
    only = parse_list(args.methods) if args.methods else None
    if only and sorted(set(only) - set(baselines.METHODS) - set(OURS)):
        return fail(PROG, f"--methods are {', '.join(OURS + tuple(baselines.METHODS))}")
    kept = pd.DataFrame()
    if args.update:
        if not (out / "compare.csv").is_file() or not only:
            return fail(PROG, "--update needs --methods and an existing --out/compare.csv")
        kept = pd.read_csv(out / "compare.csv")
        kept = kept[~(kept["model"].isin(names) & kept["method"].isin(only))]
    # --update replaces rows of its own compare.csv: no clash to refuse there
    stop = start(PROG, out, OUTPUTS, args.force or args.update, args.quick)
    if stop is not None:
        return stop
    rows = []
    for name in names:
        rows += run_model(name, args, areas, only, out)
        # after every model, so a long run that stops keeps what it measured
        write_text(out / "compare.csv", pd.concat([kept, pd.DataFrame(rows)]).to_csv(
            index=False))
    return write_outputs(pd.concat([kept, pd.DataFrame(rows)]), out)


def run_model(name: str, args, areas: list, only, out: Path) -> list:
    """One model's rows (every method, image and area) and its examples figure."""
    synthetic = name.startswith("synthetic-")
    n = args.images or (4 if args.quick else 32 if synthetic else len(PHOTOS))
    n = n if synthetic else min(n, len(PHOTOS))
    hm, x, gt, image_names = load(name, n)
    print(f"{name}: {n} images", flush=True)
    maps, own = saliencies(hm, x, args.quick, areas, lambda s: print(s, flush=True), only)
    rows = score(name, hm, x, gt, image_names, maps, own, areas, args.quick)
    # maps of earlier runs (not committed) fill in the figure when --update reran a part
    cache = out / f"maps_{name}.pt"
    if args.update and cache.is_file():
        cached = torch.load(cache, weights_only=True)
        maps = {**{k: (v, 0.0) for k, v in cached.items()}, **maps}
    torch.save({k: v[0].half() for k, v in maps.items()}, cache)
    examples(hm, x, image_names, dict(sorted(maps.items(), key=lambda kv: _rank(kv[0]))),
             max(areas), out / f"examples_{name}.png")
    return rows


def write_outputs(df: pd.DataFrame, out: Path) -> int:
    return write_summary(
        out, "compare", "Saliency methods at equal area",
        "Each method's saliency map binarised at the same area (area own: the method's own "
        "binary mask, kept_area its size). top1: the masked image "
        "keeps the model's top-1; confidence: p_target of the masked image; ratio: that over "
        "the image's; sufficiency: top-1 kept over filled-in backgrounds; grey / blur / "
        "gaussian / uniform: top-1 kept under each fill; necessity: relative drop of "
        "p_target when only the complement is shown; regions: connected regions of the mask; "
        "top5: share of its pixels in the largest five; deletion (lower is better) and "
        "insertion (higher) AUC in saliency order; pointing, iou, precision against the "
        "synthetic benchmark's object masks; seconds per image on this machine.", summary(df),
        width=220)


if __name__ == "__main__":
    sys.exit(main())
