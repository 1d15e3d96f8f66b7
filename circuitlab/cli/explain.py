"""`circuitlab explain`: a minimal mask per image (or folder of images), its numbers and its
pictures; with --reasons K, every sufficient reason."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import CircuitlabError
from ..files import refuse_overwrite, write_text
from ._common import (add_image_arg, add_model_args, add_outputs, add_seed, count, emit,
                      fraction, load, overlay, positive_int, ratio, save_mask_pngs, save_png)

OUTPUTS = ("mask.png", "explanation.png", "overlay.png", "metrics.json")
MAX_REASONS = 10
# reason i's colour in reasons.png (RGB in [0, 1]): distinct, readable on photos
_REASON_COLOURS = ((0.9, 0.2, 0.1), (0.1, 0.5, 0.95), (0.1, 0.8, 0.2), (0.95, 0.8, 0.1),
                   (0.7, 0.2, 0.9))


def _explain_one(hm, image, out: Path, args) -> dict:
    import time

    import numpy as np

    from .. import data, metrics
    from ..explain import explain, explain_at_area, minimize
    from ..explain.reasons import reasons_of_one
    t0 = time.perf_counter()
    x = data.load_image(image, hm)
    if args.mode == "amortized":
        ex = args.explainer_obj.explain(hm, x, refine=args.refine, seed=args.seed)
    else:
        ex = explain(hm, x, preset_name=args.preset, steps=args.steps, seed=args.seed)
    free, free_area = ex, float(ex.area[0])
    mask, cert = ex.mask, None
    if args.area is not None:  # pared down from the free mask to exactly this area
        ex = explain_at_area(hm, x, args.area, base=ex, steps=args.steps, seed=args.seed)
        mask = ex.mask
    elif args.minimal:
        ex = minimize(hm, x, ex, confidence=args.confidence, seed=args.seed)
        cert, mask = ex.certificates[0], ex.mask
    found = reasons_of_one(hm, x, args.reasons, int(ex.target[0]), None, args.seed,
                           args.minimal, first=free) if args.reasons > 1 else None
    seconds = time.perf_counter() - t0
    result = {
        "image": str(image), "model": hm.name, "mode": args.mode,
        "preset": args.preset if args.mode == "per-image" else None, "steps": ex.steps,
        "area_budget": args.area, "free_area": free_area,
        **metrics.mask_report(hm, x, mask, mask, ex.target, seed=args.seed),
        "seconds": seconds,
    }
    if cert is not None:
        result.update(minimal_area=float(cert.mask.mean()), area_search=ex.search[0],
                      pruned_regions=cert.pruned, locally_minimal=cert.locally_minimal,
                      region_effects=cert.regions.to_dict("records"))
    if found is not None:
        result["reasons"] = _save_reasons(out, hm, x, found)
    e_rgb = data.denormalize(mask * x, hm)[0].permute(1, 2, 0).cpu().numpy()
    save_mask_pngs(out, hm, x, mask)
    save_png(out / "explanation.png", (e_rgb * 255).round().astype(np.uint8))
    write_text(out / "metrics.json", json.dumps(result, indent=2) + "\n")
    return result


def _save_reasons(out: Path, hm, x, found) -> list:
    """reason_<i>.png (one overlay per reason, surest first) and reasons.png (all of them
    tinted by rank over the dimmed image); their numbers for metrics.json."""
    import numpy as np

    from .. import data, metrics
    rgb = data.denormalize(x[0], hm).permute(1, 2, 0).cpu().numpy()
    combined = rgb * 0.25
    rows = []
    for rank, r in enumerate(found, 1):
        m = r.mask[0, 0].numpy()[..., None]
        save_png(out / f"reason_{rank}.png", overlay(rgb, m))
        tint = np.array(_REASON_COLOURS[(rank - 1) % len(_REASON_COLOURS)])
        combined = combined * (1 - m) + (0.6 * rgb + 0.4 * tint) * m
        rows.append({"rank": rank, "order_found": r.order, "area": r.area,
                     "confidence": r.confidence,
                     "regions": int(metrics.regions(r.mask)["regions"][0])})
    save_png(out / "reasons.png", (combined * 255).round().astype(np.uint8))
    for stale in range(len(found) + 1, MAX_REASONS + 1):   # an earlier --force run's extras
        (out / f"reason_{stale}.png").unlink(missing_ok=True)
    return rows


def _check(args) -> tuple:
    """Settings that do not fit together, before anything loads: (outputs to write)."""
    names = OUTPUTS
    if not 1 <= args.reasons <= MAX_REASONS:
        raise CircuitlabError(f"--reasons is how many reasons to look for, 1 to "
                              f"{MAX_REASONS}; got {args.reasons}")
    if args.reasons > 1:
        if args.mode != "per-image" or args.area is not None:
            raise CircuitlabError("--reasons belongs to per-image mode without --area")
        names += ("reasons.png",) + tuple(f"reason_{i}.png" for i in range(1, args.reasons + 1))
    if args.mode == "amortized":
        if not args.explainer:
            raise CircuitlabError("--mode amortized needs --explainer FILE (train one with "
                                  "`circuitlab train-explainer`)")
    elif args.explainer or args.refine:
        raise CircuitlabError("--explainer and --refine belong to --mode amortized")
    return names


def cmd_explain(args) -> int:
    from tqdm.auto import tqdm

    from .. import data
    names = _check(args)
    src = Path(args.image)
    images = data.image_files(src) if src.is_dir() else [args.image]
    out = Path(args.out)
    targets = [out / Path(str(i)).stem for i in images] if src.is_dir() else [out]
    refuse_overwrite([t / n for t in targets for n in names], args.force)
    if args.mode == "amortized":
        from ..explain import Explainer
        args.explainer_obj = Explainer.load(args.explainer)
    hm = load(args)
    results = [_explain_one(hm, img, t, args) for img, t in
               tqdm(list(zip(images, targets)), desc="explain", unit="img", file=sys.stderr,
                    disable=len(images) < 2 or None)]
    lines = [f"{r['image']}: {r['label']} kept={r['top1_kept']} area="
             f"{r['area_fraction']:.3f} regions={r['regions']} conf "
             f"{r['confidence_image']:.3f} -> {r['confidence_explanation']:.3f} "
             f"necessity_drop={r['necessity_drop']:.2f}"
             + (f" locally_minimal={r['locally_minimal']}" if "locally_minimal" in r else "")
             + f" ({r['seconds']:.1f} s)" for r in results]
    lines.append(f"wrote {out}")
    emit(args, results if src.is_dir() else results[0], "\n".join(lines))
    return 0


def register(sub) -> None:
    p = sub.add_parser("explain", help="minimal mask that keeps the decision",
                       description="Find a minimal mask for an image (per-image mode): the "
                                   "optimiser's mask, searched down to the smallest area that "
                                   "holds and certified region by region; write mask.png, "
                                   "explanation.png, overlay.png and metrics.json.")
    add_model_args(p)
    add_image_arg(p)
    p.add_argument("--mode", choices=["per-image", "amortized"], default="per-image",
                   help="per-image: optimise a mask for each image (default); amortized: one "
                        "forward of a trained explainer (--explainer)")
    p.add_argument("--explainer", help="explainer checkpoint from `circuitlab "
                                       "train-explainer` (amortized mode)")
    p.add_argument("--refine", type=count, default=0,
                   help="amortized mode: per-image steps from the explainer's mask (default 0)")
    p.add_argument("--preset", choices=["default", "paper"], default="default")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="optimisation steps (preset's by default)")
    p.add_argument("--area", type=fraction, default=None,
                   help="keep exactly this fraction of the image (e.g. 0.05): the minimal "
                        "mask is pared down to it, for comparisons at equal area; "
                        "metrics.json says whether the label survived")
    p.add_argument("--reasons", type=int, default=1, metavar="K",
                   help="look for up to K disjoint explanations, each keeping the label on "
                        "its own: reason_<i>.png per reason, reasons.png all of them "
                        "(default 1)")
    p.add_argument("--minimal", action=argparse.BooleanOptionalAction, default=True,
                   help="search the smallest area budget at which the decision holds "
                        "(halving, each grown out of the last), then prune the mask region "
                        "by region until each connected region is necessary; metrics.json "
                        "says which budgets held and what each region does (default on; "
                        "not with --area)")
    p.add_argument("--confidence", type=ratio, default=1.0, metavar="R",
                   help="with --minimal: the decision holds when the label is kept with "
                        "p_target >= R x the image's (default 1; 0: the label alone)")
    add_seed(p)
    add_outputs(p, "output folder", "replace existing output files")
    p.set_defaults(func=cmd_explain)
