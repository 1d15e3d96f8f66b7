"""`circuitlab circuit`: the circuit behind a decision (one image or a folder), tested by
ablation against random circuits."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..errors import CircuitlabError
from ..files import write_text
from ._common import (add_ablation, add_batch_args, add_image_arg, add_model_args,
                      add_outputs, add_reference, add_seed, bars_on, count, emit, fraction,
                      mask_from, positive_int, provenance, reference_images, steps_bar,
                      target_index)
from ._folder import run_folder, run_one
from .classes import cmd_class_circuit

OUTPUTS = ("nodes.csv", "edges.csv", "nodes.parquet", "edges.parquet", "circuit.graphml",
           "circuit.json", "circuit.png", "circuit.html", "validation.json")
FIGURES = ("circuit.png", "circuit.html")     # what --no-figures leaves out


def _outputs(args) -> tuple:
    """What each image's folder gets: every output, or all but the figures."""
    return OUTPUTS if args.figures else tuple(n for n in OUTPUTS if n not in FIGURES)


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
    return (f"{result['image']}: {result['label']} circuit of {result['units']} units "
            f"({100 * result['unit_fraction']:.1f} % of {result['tapped_units']}), "
            f"{how}{result['edges']} edges, read on the {result['read_on']}\n"
            f"keep only the circuit ({args.ablation} ablation): logit x "
            f"{f['logit_fraction']:.2f}, contrast kept "
            f"{f.get('contrast_fraction', float('nan')):.2f}, top-1 kept {f['top1_kept']}; "
            f"random circuits: contrast kept {rf.get('contrast_fraction', float('nan')):.2f}; "
            f"remove it: top-1 kept {result['necessity']['top1_kept']}"
            + (f"\n{edge.rstrip()}" if edge else ""))


def _short(row: dict) -> str:
    """One line per image of a folder run, from its results-table row."""
    return (f"{row['image']}: {row['label']} circuit of {row['units']} units "
            f"({100 * row['unit_fraction']:.1f} %), contrast kept "
            f"{row.get('faithfulness.contrast_fraction', float('nan')):.2f} (random "
            f"{row.get('random_faithfulness.contrast_fraction', float('nan')):.2f}), top-1 "
            f"kept {row.get('faithfulness.top1_kept')}")


def _config(args):
    """The readout's settings, checked before anything loads."""
    from ..circuits import ReadoutConfig
    if args.explain and args.explanation:
        raise CircuitlabError("pass --explain or --explanation DIR, not both")
    return ReadoutConfig(
        k=args.k, mass=args.mass, select_by=args.select, faithfulness=args.faithfulness,
        refine_steps=args.refine, edges=args.edges, gradient=args.gradient, units=args.units,
        budget=args.budget, ablation=args.ablation, steps=args.steps, rank_by=args.rank_by)


def _circuit_one(hm, x, image, out: Path, args, refs) -> dict:
    """One image's circuit, validated, its files written into ``out``."""
    from ..circuits import faithfulness, read_circuit, summarize
    from ..circuits.drawing import unit_crops
    t0 = time.perf_counter()
    config = args.readout
    explanation, area = _explanation(args, hm, x)
    target = target_index(hm, args.target)
    with steps_bar("learned gates", config.steps,
                   show=config.select_by == "learned" and getattr(args, "one_image", False)
                   and bars_on(args)
                   ) as progress:
        circuit = read_circuit(hm, x, explanation, target, config=config, reference=refs,
                               progress=progress)
    val = faithfulness(hm, x, circuit, ablation=args.ablation, reference=refs, seed=args.seed)
    result = _result(args, hm, circuit, summarize(val), area)
    result["image"] = str(image)
    if explanation is not None:  # the same readout on the full image, for comparison
        image_circuit = read_circuit(hm, x, None, target, config=config, reference=refs)
        iv = summarize(faithfulness(hm, x, image_circuit, ablation=args.ablation,
                                    reference=refs, n_random=0))
        d = circuit.diff(image_circuit)
        result["image_circuit"] = {"logit_fraction": iv["keep"]["logit_fraction"],
                                   "top1_kept": iv["keep"]["top1_kept"],
                                   "shared_units": int((d["in"] == "both").sum())}
    result.update(seconds=time.perf_counter() - t0, **provenance(args, hm))
    circuit.save(out)
    if args.figures:
        circuit.plot(out / "circuit.png")
        circuit.to_html(out / "circuit.html", crops=unit_crops(hm, x, circuit))
    write_text(out / "validation.json", json.dumps(result, indent=2) + "\n")
    return result


def _circuit_batch(hm, items: list, args) -> None:
    refs = args.refs_of(hm)
    for image, x, publish in items:
        publish(image, lambda tmp, image=image, x=x: _circuit_one(hm, x, image, tmp, args,
                                                                   refs.to(x.device)))


def cmd_circuit(args) -> int:
    args.readout = _config(args)
    if args.explanation and Path(args.image).is_dir():
        raise CircuitlabError("--explanation names one image's explanation; for a folder use "
                              "--explain")
    cached = {}

    def refs_of(hm):   # one reference set per run
        if "refs" not in cached:
            cached["refs"] = reference_images(args, hm, str(args.image))
        return cached["refs"]
    args.refs_of = refs_of
    if Path(args.image).is_dir() and args.target is not None:
        return cmd_class_circuit(args)
    if Path(args.image).is_dir():
        return run_folder(args, "circuit", OUTPUTS, _outputs(args), _circuit_batch,
                          lambda rows: "\n".join(_short(r) for r in rows))
    result = run_one(args, OUTPUTS, _circuit_batch)
    emit(args, result, _line(args, result) + f"\nwrote {args.out}")
    return 0


def _add_selection(p) -> None:
    """How the circuit's units are chosen, and how big it may be."""
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


def register(sub) -> None:
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
    _add_selection(p)
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
    p.add_argument("--target", default=None, metavar="CLASS",
                   help="the class whose circuit to read (index or label; default the top-1); "
                        "with a folder of that class's images: the class circuit, validated "
                        "on held-out images")
    p.add_argument("--held-out", type=fraction, default=0.25,
                   help="class circuit: fraction of the images kept to test it (default 0.25)")
    p.add_argument("--min-share", type=fraction, default=0.5,
                   help="class circuit: keep units chosen on at least this fraction of the "
                        "images (default 0.5)")
    p.add_argument("--figures", action=argparse.BooleanOptionalAction, default=True,
                   help="write circuit.png and circuit.html (default); --no-figures writes "
                        "the tables, graph and validation only: over a folder of images the "
                        "figures are a third of the time and half of the disk")
    add_ablation(p, "of the units outside the circuit, in the search and the validation: "
                    "mean over the reference images (default), zero, or resample")
    add_reference(p)
    add_seed(p)
    add_batch_args(p)
    add_outputs(p, "output folder (a folder of images: one sub-folder per image and "
                   "results.csv)", "replace existing output files (a folder run: redo every "
                   "image instead of resuming)")
    p.set_defaults(func=cmd_circuit)

