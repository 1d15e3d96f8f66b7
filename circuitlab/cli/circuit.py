"""`circuitlab circuit`, `ablate` and `patch`: the circuit behind a decision, tested by
ablation against random circuits; per-unit effects of one layer as CSV."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import CircuitlabError
from ..files import refuse_overwrite, write_text
from ._common import (add_ablation, add_image_arg, add_model_args, add_outputs, add_seed, count, emit,
                      fraction, load, mask_from, positive_int, reference_images)

OUTPUTS = ("nodes.csv", "edges.csv", "nodes.parquet", "edges.parquet", "circuit.graphml",
           "circuit.json", "circuit.png", "circuit.html", "validation.json")


def _explanation(args, hm, x):
    """(the explanation to read the circuit on or None, its area or None)."""
    if args.explain:
        from ..explain import explain
        ex = explain(hm, x, seed=args.seed)
        return ex.explanation, float(ex.area[0])
    if args.explanation:
        m = mask_from(args.explanation, hm).to(x.device)
        return m * x, float(m.mean())
    return None, None


def _result(args, hm, circuit, summary, area) -> dict:
    n_tapped = sum(hm.n_units(layer) for layer in circuit.units)
    meta = circuit.meta
    return {
        "model": hm.name, "image": str(args.image), "label": meta["label"],
        "read_on": meta["read_on"], "explanation_area": area,
        "units": summary["units"], "tapped_units": n_tapped,
        "unit_fraction": summary["units"] / n_tapped,
        "edges": len(circuit.edges), "ablation": args.ablation, "select": args.select,
        "size_search": {k[len("search_"):]: v for k, v in meta.items()
                        if k.startswith("search_")} or None,
        "edge_search": {k[len("edge_search_"):]: v for k, v in meta.items()
                        if k.startswith("edge_search_")} or None,
        "faithfulness": summary["keep"], "necessity": summary["remove"],
        "random_faithfulness": summary["random"],
    }


def _line(args, result: dict) -> str:
    f, rf = result["faithfulness"], result["random_faithfulness"]
    how = ""
    if args.edges == "attribution":
        how = (f"the ends of the smallest edge circuit keeping {args.faithfulness:.2f} of the "
               f"contrast, ")
    elif args.select == "faithful":
        how = (f"the smallest keeping {args.faithfulness:.2f} of the contrast found by the "
               f"size search{' and learned gates' if args.refine else ''}, ")
    e = result["edge_search"]
    edge = "" if not e else (
        f"edge circuit: {e['edges']} of {e['total']} edges between its taps "
        f"({100 * e['fraction']:.1f} %) keep contrast {e['contrast']:.2f}, top-1 kept "
        f"{e['top1_kept']}; random edges of that size: contrast {e['random_contrast']:.2f}\n")
    return (f"{args.image}: {result['label']} circuit of {result['units']} units "
            f"({100 * result['unit_fraction']:.1f} % of {result['tapped_units']}), "
            f"{how}{result['edges']} edges, read on the {result['read_on']}\n"
            f"keep only the circuit ({args.ablation} ablation): logit x "
            f"{f['logit_fraction']:.2f}, contrast kept "
            f"{f.get('contrast_fraction', float('nan')):.2f}, top-1 kept {f['top1_kept']}; "
            f"random circuits: contrast kept {rf.get('contrast_fraction', float('nan')):.2f}; "
            f"remove it: top-1 kept {result['necessity']['top1_kept']}\n{edge}"
            f"wrote {args.out}")


def cmd_circuit(args) -> int:
    import time

    from .. import data
    from ..circuits import ReadoutConfig, faithfulness, read_circuit, summarize
    from ..circuits.drawing import unit_crops
    out = Path(args.out)
    refuse_overwrite([out / n for n in OUTPUTS], args.force)
    if args.explain and args.explanation:
        raise CircuitlabError("pass --explain or --explanation DIR, not both")
    config = ReadoutConfig(  # checks the settings before anything loads
        k=args.k, mass=args.mass, select_by=args.select, faithfulness=args.faithfulness,
        refine_steps=args.refine, edges=args.edges, gradient=args.gradient, units=args.units,
        budget=args.budget, ablation=args.ablation, steps=args.steps, rank_by=args.rank_by)
    hm = load(args)
    t0 = time.perf_counter()
    x = data.load_image(args.image, hm)
    explanation, area = _explanation(args, hm, x)
    refs = reference_images(args, hm, str(args.image)).to(x.device)
    circuit = read_circuit(hm, x, explanation, config=config, reference=refs)
    val = faithfulness(hm, x, circuit, ablation=args.ablation, reference=refs, seed=args.seed)
    result = _result(args, hm, circuit, summarize(val), area)
    if explanation is not None:  # the same readout on the full image, for comparison
        image_circuit = read_circuit(hm, x, None, config=config, reference=refs)
        iv = summarize(faithfulness(hm, x, image_circuit, ablation=args.ablation, reference=refs,
                                    n_random=0))
        d = circuit.diff(image_circuit)
        result["image_circuit"] = {"logit_fraction": iv["keep"]["logit_fraction"],
                                   "top1_kept": iv["keep"]["top1_kept"],
                                   "shared_units": int((d["in"] == "both").sum())}
    result["seconds"] = time.perf_counter() - t0
    circuit.save(out)
    circuit.plot(out / "circuit.png")
    circuit.to_html(out / "circuit.html", crops=unit_crops(hm, x, circuit))
    write_text(out / "validation.json", json.dumps(result, indent=2) + "\n")
    emit(args, result, _line(args, result))
    return 0


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


def _add_reference(p) -> None:
    p.add_argument("--reference", help="folder of images for mean / resample ablation, or "
                                       "'synthetic' (default: the offline sample photos)")


def _register_circuit(sub) -> None:
    p = sub.add_parser("circuit", help="read and validate the circuit behind a decision",
                       description="Read the channel-level circuit of an image's decision "
                                   "(on its minimal explanation with --explain or "
                                   "--explanation DIR), test it by ablation against random "
                                   "circuits, and write nodes.csv, edges.csv (and .parquet), "
                                   "circuit.graphml, circuit.json, circuit.png, circuit.html "
                                   "(interactive) and validation.json.")
    add_model_args(p)
    add_image_arg(p)
    p.add_argument("--explain", action="store_true",
                   help="explain the image first and read the circuit on the explanation")
    p.add_argument("--explanation", help="folder written by `circuitlab explain` (its "
                                         "mask.png) to read the circuit on")
    p.add_argument("--select", choices=["faithful", "energy", "attribution", "learned"],
                   default="faithful", help="faithful (default): the smallest circuit that "
                   "keeps --faithfulness of the image-vs-reference contrast with top-1 kept; "
                   "energy (the paper's readout: descriptive, not faithful), attribution, or "
                   "learned: --budget of all tapped units chosen together by optimised gates "
                   "under --ablation of the rest")
    p.add_argument("--faithfulness", type=float, default=0.8,
                   help="--select faithful: contrast the circuit must keep (default 0.8)")
    p.add_argument("--rank-by", choices=["iterative", "attribution", "eap-ig", "energy",
                                         "random"], default="iterative",
                   help="--select faithful: the order the size search cuts: iterative "
                   "attribution patching (default), plain attribution patching, eap-ig "
                   "(integrated gradients from the reference mean), energy or random")
    p.add_argument("--refine", type=count, default=0, metavar="STEPS",
                   help="--select faithful: shrink the circuit further with learned gates "
                   "started from it, STEPS per smaller budget (e.g. 100; minutes on a CPU)")
    p.add_argument("--k", type=positive_int, default=None,
                   help="--select energy / attribution: units per tapped layer (default 16)")
    p.add_argument("--mass", type=float, default=None,
                   help="instead of --k: fewest units holding this fraction of the score")
    p.add_argument("--budget", type=fraction, default=0.1,
                   help="--select learned: fraction of the tapped units (default 0.1)")
    p.add_argument("--steps", type=positive_int, default=300,
                   help="--select learned: optimisation steps (default 300)")
    p.add_argument("--edges", choices=["auto", "weight", "effective", "attribution", "none"],
                   default="auto",
                   help="weight: |W| of the conv between taps, or composed through the blocks "
                   "between them (kind path); effective: gradient x activation on this "
                   "image; auto: weight where the modules compose, else effective; "
                   "attribution: only the fewest edges, by edge attribution patching, whose "
                   "edge circuit keeps --faithfulness of the contrast (validated exactly)")
    p.add_argument("--gradient", action="store_true", help="weight edges by |d logit / d dst|")
    p.add_argument("--units", choices=["auto", "components", "channels"], default="auto",
                   help="ViTs: attention heads and MLP neurons (components, the default for "
                        "ViTs) or residual channels of the tapped blocks")
    add_ablation(p, "of the units outside the circuit, in the search and the validation: "
                    "mean over the reference images (default), zero, or resample")
    _add_reference(p)
    add_seed(p)
    add_outputs(p, "output folder", "replace existing output files")
    p.set_defaults(func=cmd_circuit)


def register(sub) -> None:
    _register_circuit(sub)
    p = sub.add_parser("ablate", help="ablate each unit of a layer, write CSV",
                       description="Ablate every unit of --layer on its own (batched) and "
                                   "write the change of the top-1 logit per unit as CSV.")
    add_model_args(p)
    add_image_arg(p)
    p.add_argument("--layer", "-l", required=True, help="hook name (see `circuitlab layers`)")
    add_ablation(p, "mean over the reference images (default), zero, or resample")
    _add_reference(p)
    add_outputs(p, "CSV file to write", "replace an existing --out")
    p.set_defaults(func=cmd_ablate)

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
    p.set_defaults(func=cmd_patch)
