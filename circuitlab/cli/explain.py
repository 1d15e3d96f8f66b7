"""`circuitlab explain`: a minimal mask per image (or folder of images), its numbers and its
pictures; with --reasons K, every sufficient reason."""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from ..errors import CircuitlabError
from ..files import write_text
from ..execution import PRECISIONS, TORCH_COMPILE_MODES, Execution
from ._common import (add_batch_args, add_image_arg, add_model_args, add_outputs, add_seed,
                      bars_on, count, emit, fraction, overlay, positive_int, provenance, ratio,
                      save_mask_pngs, save_png, steps_bar, target_index)
from ._folder import run_folder, run_one
from ._modes import (PER_IMAGE_FLAGS, add_region_flags, auto_mode, belong, per_image_flags,
                     region_flags, region_report, region_search, resolved_mode)

OUTPUTS = ("mask.png", "explanation.png", "overlay.png", "metrics.json")
MAX_REASONS = 10
# reason i's colour in reasons.png (RGB in [0, 1]): distinct, readable on photos
_REASON_COLOURS = ((0.9, 0.2, 0.1), (0.1, 0.5, 0.95), (0.1, 0.8, 0.2), (0.95, 0.8, 0.1),
                   (0.7, 0.2, 0.9))


def _first_pass(hm, x, args):
    """The free masks of a batch: optimised together (per-image mode) or one forward of the
    explainer (amortized)."""
    from ..explain import explain
    if args.mode == "regions":
        from ..explain.regions import explain_regions
        return explain_regions(hm, x, region_search(args),
                               target=target_index(hm, args.target), seed=args.seed)
    if args.mode == "amortized":
        if args.target is not None:
            raise CircuitlabError("--target belongs to per-image mode: the explainer explains "
                                  "the top-1")
        return args.explainer_obj.explain(hm, x, refine=args.refine, seed=args.seed)
    from ..explain import preset
    total = args.steps or preset(args.preset, hm.family.name, min(x.shape[-2:])).steps
    with steps_bar("explain", total, show=getattr(args, "one_image", False) and
                   bars_on(args)) as progress:
        return explain(hm, x, preset_name=args.preset, steps=args.steps, seed=args.seed,
                       target=target_index(hm, args.target), progress=progress,
                       execution=_execution(args))


def _execution(args) -> Execution:
    return Execution(args.precision, None if args.compile == "off" else args.compile,
                     args.channels_last, args.fold_batchnorm)


def _second_pass(hm, x, free, args):
    """The batch's masks after --area (pared down to it) or --minimal (the area search,
    every image's halvings in the same rounds, then certified); else the free masks."""
    from ..explain import explain_at_area, minimize
    if args.mode == "regions":        # pruned and certified by the region search itself
        return free
    if args.area is not None:
        return explain_at_area(hm, x, args.area, base=free, steps=args.steps, seed=args.seed)
    if args.minimal:
        return minimize(hm, x, free, seed=args.seed, **({} if args.confidence is None else
                                                         {"confidence": args.confidence}))
    return free


def _finish_one(hm, x, free, ex, image, out: Path, args, shared_seconds: float) -> dict:
    """One image from its free and final masks: --reasons, metrics, files.
    ``shared_seconds``: its share of the batch's passes."""

    import numpy as np

    from .. import data, metrics
    from ..explain.reasons import reasons_of_one
    t0 = time.perf_counter()
    mask = ex.mask
    regions = args.mode == "regions"
    cert = ex.certificates[0] if args.area is None and (args.minimal or regions) else None
    found = reasons_of_one(hm, x, args.reasons, int(ex.target[0]), None, args.seed,
                           args.minimal, first=free,
                           search=region_search(args) if regions else None) \
        if args.reasons > 1 else None
    result = {
        "image": str(image), "model": hm.name, "mode": args.mode,
        "preset": args.preset if args.mode == "per-image" else None, "steps": ex.steps,
        "area_budget": args.area, "free_area": float(free.area[0]),
        "execution": asdict(_execution(args)) if args.mode == "per-image" else None,
        **metrics.mask_report(hm, x, mask, mask, ex.target, seed=args.seed),
        "seconds": shared_seconds + time.perf_counter() - t0, **provenance(args, hm),
    }
    if regions:
        result.update(region_report(args, ex.search[0], ex.scoring), found=bool(ex.found[0]),
                      region_search=ex.search[0])
    if cert is not None:
        result.update(minimal_area=float(cert.mask.mean()),
                      area_search=None if regions else ex.search[0],
                      pruned_regions=cert.pruned, locally_minimal=cert.locally_minimal,
                      region_effects=cert.regions.to_dict("records"))
    if found is not None:
        result["reasons"] = _save_reasons(out, hm, x, found)
    e_rgb = data.denormalize(mask * x, hm)[0].permute(1, 2, 0).cpu().numpy()
    save_mask_pngs(out, hm, x, mask)
    save_png(out / "explanation.png", (e_rgb * 255).round().astype(np.uint8))
    write_text(out / "metrics.json", json.dumps(result, indent=2) + "\n")
    return result


def _explain_batch(hm, items: list, args):
    """``items``: [(image, x (1, C, H, W), publish)] explained together; ``publish(image,
    work)`` writes one image's result as a whole (a failure of the batch's passes becomes
    each of its images' failure)."""

    import torch

    t0 = time.perf_counter()
    args.mode = resolved_mode(args.mode, min(items[0][1].shape[-2:]))   # every batch alike
    try:
        x = torch.cat([x for _, x, _ in items])
        free = _first_pass(hm, x, args)
        final = _second_pass(hm, x, free, args)
    except Exception as e:  # noqa: BLE001 - recorded per image by publish
        for image, _, publish in items:
            publish(image, _failing(e))
        return
    share = (time.perf_counter() - t0) / len(items)
    for i, (image, xi, publish) in enumerate(items):
        publish(image, lambda tmp, i=i, image=image, xi=xi: _finish_one(
            hm, xi, free.row(i), final.row(i), image, tmp, args, share))


def _failing(error: Exception):
    def work(tmp):
        raise error
    return work


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
    if args.mode == "auto" and not (args.explainer or args.refine):
        args.mode = auto_mode(args)
    if not 1 <= args.reasons <= MAX_REASONS:
        raise CircuitlabError(f"--reasons is how many reasons to look for, 1 to "
                              f"{MAX_REASONS}; got {args.reasons}")
    if args.reasons > 1:
        if args.mode not in ("per-image", "regions") or args.area is not None:
            raise CircuitlabError("--reasons belongs to per-image mode (without --area) or "
                                  "--mode regions")
        names += ("reasons.png",) + tuple(f"reason_{i}.png" for i in range(1, args.reasons + 1))
    if args.mode != "per-image" and _execution(args) != Execution():
        raise CircuitlabError("--precision, --compile, --channels-last and --fold-batchnorm "
                              "belong to per-image mode")
    if args.mode == "regions":
        flags = ", ".join(f for f in (per_image_flags(args, shared=False),
                                      args.explainer and "--explainer",
                                      args.refine and "--refine") if f)
        if flags:
            raise CircuitlabError(f"--mode regions builds its own mask: not with {flags}")
    regions = region_flags(args)
    if args.mode != "regions" and regions:
        raise CircuitlabError(f"{regions} {belong(regions)} to --mode regions")
    if args.mode == "amortized":
        if not args.explainer:
            raise CircuitlabError("--mode amortized needs --explainer FILE (train one with "
                                  "`circuitlab train-explainer`)")
    elif args.explainer or args.refine:
        raise CircuitlabError("--explainer and --refine belong to --mode amortized")
    return names


def cmd_explain(args) -> int:
    names = _check(args)
    if args.mode == "amortized":
        from ..explain import Explainer
        args.explainer_obj = ex = Explainer.load(args.explainer)
        if ex.step < ex.config.steps:
            raise CircuitlabError(f"{args.explainer} is unfinished: trained {ex.step} of "
                                  f"{ex.config.steps} steps; finish it with `circuitlab "
                                  f"train-explainer ... --out {args.explainer} --resume`")
    if Path(args.image).is_dir():
        return run_folder(args, "explain", names, OUTPUTS, _explain_batch, _summary)
    result = run_one(args, names, _explain_batch)
    emit(args, result, _summary([result]) + f"\nwrote {args.out}")
    return 0


def _summary(results: list) -> str:
    return "\n".join(
        f"{r['image']}: {r['label']} kept={r['top1_kept']} area={r['area_fraction']:.3f} "
        f"regions={r['regions']} conf {r['confidence_image']:.3f} -> "
        f"{r['confidence_explanation']:.3f} necessity_drop={r['necessity_drop']:.2f}"
        + (f" locally_minimal={r['locally_minimal']}" if "locally_minimal" in r else "")
        + f" ({r['seconds']:.1f} s)" for r in results)


def _add_per_image_flags(p) -> None:
    """The flags of per-image mode (PER_IMAGE_FLAGS: under --mode auto any of them picks it)."""
    p.add_argument("--preset", choices=["default", "paper"],
                   default=PER_IMAGE_FLAGS["preset"])
    p.add_argument("--steps", type=positive_int, default=PER_IMAGE_FLAGS["steps"],
                   help="optimisation steps (preset's by default)")
    p.add_argument("--area", type=fraction, default=PER_IMAGE_FLAGS["area"],
                   help="keep exactly this fraction of the image (e.g. 0.05): the minimal "
                        "mask is pared down to it, for comparisons at equal area; "
                        "metrics.json says whether the label survived")
    p.add_argument("--reasons", type=int, default=PER_IMAGE_FLAGS["reasons"], metavar="K",
                   help="look for up to K disjoint explanations, each keeping the label on "
                        "its own: reason_<i>.png per reason, reasons.png all of them; "
                        "per-image mode, or superpixel regions with --mode regions (each "
                        "reason a region search of its own) (default 1)")
    p.add_argument("--minimal", action=argparse.BooleanOptionalAction,
                   default=PER_IMAGE_FLAGS["minimal"],
                   help="search the smallest area budget at which the decision holds "
                        "(halving, each grown out of the last), then prune the mask region "
                        "by region until each connected region is necessary; metrics.json "
                        "says which budgets held and what each region does (default on; "
                        "not with --area)")
    p.add_argument("--confidence", type=ratio, default=None, metavar="R",
                   help="the decision holds when the label is kept with p_target >= R x the "
                        "image's (default: 1 for per-image --minimal, 0 in regions mode: the "
                        "label alone)")
    p.add_argument("--precision", choices=PRECISIONS, default=PER_IMAGE_FLAGS["precision"],
                   help="the classifier's forwards in the optimisation loop: fp32 (default) or "
                        "bf16 autocast (faster on GPUs; masks differ from fp32's, docs/"
                        "cli.md); the checks and certificate stay in the model's precision")
    p.add_argument("--compile", choices=["off", *TORCH_COMPILE_MODES],
                   default=PER_IMAGE_FLAGS["compile"],
                   help="torch.compile the loop's forwards: default, or reduce-overhead (CUDA "
                        "graphs); pays on a GPU over many images, not for one on a CPU")
    p.add_argument("--channels-last", action="store_true",
                   help="run convolutions in channels-last layout (GPUs with tensor cores)")
    p.add_argument("--fold-batchnorm", action="store_true",
                   help="run the loop's forwards on a copy of the model with each BatchNorm "
                        "folded into its convolution (faster; masks differ from the "
                        "unfolded run's, docs/cli.md)")


def register(sub) -> None:
    p = sub.add_parser("explain", help="minimal mask that keeps the decision",
                       description="Find a minimal mask for an image: on photos a few "
                                   "superpixel regions without which the label is lost; on "
                                   "small inputs (or with --mode per-image) the optimiser's "
                                   "pixel mask, searched down to the smallest area that "
                                   "holds and certified region by region; write mask.png, "
                                   "explanation.png, overlay.png and metrics.json.")
    add_model_args(p)
    add_image_arg(p)
    p.add_argument("--mode", choices=["auto", "per-image", "amortized", "regions"],
                   default="auto",
                   help="regions: a few compact superpixel regions, grown greedily until the "
                        "label holds over the mean colour and over noise, then pruned; "
                        "per-image: optimise a pixel mask for each image (the paper's "
                        "method); amortized: one forward of a trained explainer "
                        "(--explainer); auto (default): regions for photos (inputs of "
                        "128 px or more) unless a per-image flag is given, per-image below")
    add_region_flags(p)
    p.add_argument("--explainer", help="explainer checkpoint from `circuitlab "
                                       "train-explainer` (amortized mode)")
    p.add_argument("--refine", type=count, default=0,
                   help="amortized mode: per-image steps from the explainer's mask (default 0)")
    p.add_argument("--target", default=None, metavar="CLASS",
                   help="the class whose decision to explain: an index or a label (default: "
                        "the model's top-1 on each image)")
    _add_per_image_flags(p)
    add_seed(p)
    add_batch_args(p)
    add_outputs(p, "output folder", "replace existing output files (a folder run: redo "
                                    "every image instead of resuming)")
    p.set_defaults(func=cmd_explain)
