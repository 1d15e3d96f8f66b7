"""`circuitlab ablate` and `patch`: per-unit effects of one layer, as CSV."""
from __future__ import annotations

from ..files import locked, refuse_overwrite, write_text
from ._common import (add_ablation, add_image_arg, add_model_args, add_outputs, add_reference,
                      emit, load, mask_from, reference_images)


def _holding_out(command):
    """``command`` run while --out is locked against a second writer."""
    def run(args) -> int:
        with locked(args.out):
            return command(args)
    return run


def _unit_experiment(args):
    """(hm, x) for ablate / patch, after refusing to replace --out and checking --layer."""
    from .. import data
    refuse_overwrite([args.out], args.force)
    hm = load(args)
    x = data.load_image(args.image, hm)
    hm.point(args.layer)
    return hm, x


def cmd_ablate(args) -> int:
    from ..circuits import ablate_units
    hm, x = _unit_experiment(args)
    refs = reference_images(args, hm, str(args.image)).to(x.device) \
        if args.ablation != "zero" else None
    df = ablate_units(hm, x, args.layer, ablation=args.ablation, reference=refs)
    write_text(args.out, df.to_csv(index=False))
    worst = df.nsmallest(5, "logit_change")
    flips = int((~df["top1_kept"]).sum())
    emit(args, {"model": hm.name, "layer": args.layer, "ablation": args.ablation,
                "units": len(df), "flips": flips, "csv": str(args.out),
                "top": worst.to_dict("records")},
         f"{args.layer}: {len(df)} units ablated one at a time ({args.ablation}); {flips} flip "
         f"top-1. Largest logit drops:\n{worst.to_string(index=False)}\nwrote {args.out}")
    return 0


def cmd_patch(args) -> int:
    from ..circuits import agreement, patch_units
    hm, x = _unit_experiment(args)
    m = mask_from(args.explanation, hm).to(x.device)
    e, c = m * x, (1 - m) * x
    target = int(hm(x).argmax(-1))
    clean, corrupt = (e, c) if args.direction == "into-complement" else (c, e)
    df = patch_units(hm, clean, corrupt, args.layer, target=target)
    write_text(args.out, df.to_csv(index=False))
    agree = agreement(df)
    top = df.reindex(df["exact"].abs().sort_values(ascending=False).index).head(5)
    emit(args, {"model": hm.name, "layer": args.layer, "direction": args.direction,
                "units": len(df), "agreement": agree, "csv": str(args.out),
                "top": top.to_dict("records")},
         f"{args.layer}: {len(df)} units patched {args.direction} (target "
         f"{hm.label(target)}); attribution patching vs exact: pearson "
         f"{agree['pearson']:.2f}, spearman {agree['spearman']:.2f}. Largest effects:\n"
         f"{top.to_string(index=False)}\nwrote {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("ablate", help="ablate each unit of a layer, write CSV",
                       description="Ablate every unit of --layer on its own (batched) and "
                                   "write the change of the top-1 logit per unit as CSV.")
    add_model_args(p)
    add_image_arg(p)
    p.add_argument("--layer", "-l", required=True, help="hook name (see `circuitlab layers`)")
    add_ablation(p, "mean over the reference images (default), zero, or resample")
    add_reference(p)
    add_outputs(p, "CSV file to write", "replace an existing --out")
    p.set_defaults(func=_holding_out(cmd_ablate))

    p = sub.add_parser("patch", help="patch each unit between explanation and complement",
                       description="Patch every unit of --layer from the explanation run "
                                   "into the complement run (or back), exactly and by "
                                   "attribution patching, and write both per unit as CSV.")
    add_model_args(p)
    add_image_arg(p)
    p.add_argument("--explanation", required=True,
                   help="folder written by `circuitlab explain` (its mask.png)")
    p.add_argument("--layer", "-l", required=True, help="hook name (see `circuitlab layers`)")
    p.add_argument("--direction", choices=["into-complement", "into-explanation"],
                   default="into-complement")
    add_outputs(p, "CSV file to write", "replace an existing --out")
    p.set_defaults(func=_holding_out(cmd_patch))
