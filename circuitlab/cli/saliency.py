"""`circuitlab saliency`: one baseline method's map, cut at an area and scored as `explain`
scores its masks."""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import CircuitlabError
from ..files import write_text
from ._common import (add_batch_args, add_image_arg, add_model_args, add_outputs, emit,
                      fraction, provenance, save_mask_pngs, save_png)
from ._folder import run_folder, run_one

OUTPUTS = ("saliency.png", "mask.png", "overlay.png", "metrics.json")
METHODS = ("gradcam", "gradcam++", "ig", "rise", "extremal", "rollout", "cls_attention")


def _saliency_one(hm, x, image, out: Path, args) -> dict:
    import numpy as np

    from .. import baselines, metrics
    kw = {"layer": args.layer} if args.layer else {}
    if args.method == "extremal":
        kw["area"] = args.area
    t0 = time.perf_counter()
    sal = baselines.saliency(hm, x, args.method, **kw)
    seconds = time.perf_counter() - t0
    mask = baselines.binarize_at_area(sal, args.area)
    result = {"image": str(image), "model": hm.name, "method": args.method,
              **metrics.mask_report(hm, x, mask, sal), "seconds": seconds,
              **provenance(args, hm)}
    save_mask_pngs(out, hm, x, mask)
    save_png(out / "saliency.png", (sal[0, 0].numpy() * 255).round().astype(np.uint8))
    write_text(out / "metrics.json", json.dumps(result, indent=2) + "\n")
    return result


def _saliency_batch(hm, items: list, args) -> None:
    _check_method(hm, args)
    for image, x, publish in items:
        publish(image, lambda tmp, image=image, x=x: _saliency_one(hm, x, image, tmp, args))


def _check_method(hm, args) -> None:
    from .. import baselines
    if args.method not in baselines.methods_for(hm):
        raise CircuitlabError(f"--method {args.method} does not apply to {hm.name}; use one "
                              f"of {', '.join(baselines.methods_for(hm))}")


def _summary(args, rows) -> str:
    return "\n".join(f"{r['image']}: {args.method} top {args.area:.0%}: {r['label']} "
                     f"kept={r['top1_kept']} conf {r['confidence_image']:.3f} -> "
                     f"{r['confidence_explanation']:.3f} ({r['seconds']:.1f} s)" for r in rows)


def cmd_saliency(args) -> int:
    if args.layer and args.method not in ("gradcam", "gradcam++"):
        raise CircuitlabError("--layer belongs to --method gradcam / gradcam++")
    if Path(args.image).is_dir():
        return run_folder(args, "saliency", OUTPUTS, OUTPUTS, _saliency_batch,
                          lambda rows: _summary(args, rows))
    result = run_one(args, OUTPUTS, _saliency_batch)
    emit(args, result, _summary(args, [result]) + f"\nwrote {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("saliency", help="a baseline saliency map (Grad-CAM, IG, RISE, ...)",
                       description="Run one baseline saliency method on an image and write "
                                   "saliency.png (the map), mask.png (its top --area), "
                                   "overlay.png and metrics.json (the same numbers as "
                                   "`explain`, for comparison at equal area).")
    add_model_args(p)
    add_image_arg(p)
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--area", type=fraction, default=0.05,
                   help="fraction kept by mask.png (and extremal's area; default 0.05)")
    p.add_argument("--layer", help="gradcam / gradcam++: hook name to read (default: the "
                                   "last spatial map, or the last ViT block's norm1)")
    add_batch_args(p)
    add_outputs(p, "output folder (a folder of images: one sub-folder per image and "
                   "results.csv)", "replace existing output files (a folder run: redo every "
                   "image instead of resuming)")
    p.set_defaults(func=cmd_saliency)
