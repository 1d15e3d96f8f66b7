"""`circuitlab models`, `layers` and `predict`: what loads, what a model's hook points are, what
it says about an image."""
from __future__ import annotations

import sys
from pathlib import Path

from ._common import (add_image_arg, add_json, add_model_args, bars_on, emit, load,
                      positive_int)


def cmd_models(args) -> int:
    import pandas as pd

    from ..registry import model_table
    rows = model_table()
    emit(args, rows, pd.DataFrame(rows).to_string(index=False))
    return 0


def cmd_layers(args) -> int:
    hm = load(args)
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
    emit(args, payload, text)
    return 0


def cmd_predict(args) -> int:
    from tqdm.auto import tqdm

    from .. import data
    hm = load(args)
    src = Path(args.image)
    images = data.image_files(src) if src.is_dir() else [args.image]
    results = []
    for img in tqdm(images, desc="predict", unit="img",
                    disable=len(images) < 2 or not bars_on(args) or None,
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
    emit(args, {"model": hm.name, "results": results}, "\n".join(lines))
    return 0


def register(sub) -> None:
    p = sub.add_parser("models", help="models available offline and how they load",
                       description="List the models available offline and how each loads.")
    add_json(p)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("layers", help="hook names, shapes and kinds of a model",
                       description="List a model's hook points: names to pass to "
                                   "run_with_cache / run_with_hooks, with shapes at the "
                                   "model's input size and unit counts.")
    add_model_args(p)
    p.add_argument("--pattern", help="glob over hook names, e.g. 'layer3.*'")
    p.add_argument("--kind", help="only this kind (conv, block, attn, mlp, resid, ...)")
    p.add_argument("--all", action="store_true",
                   help="also list module inputs (*.hook_in) and plain-path aliases")
    add_json(p)
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("predict", help="top-k labels of an image with probabilities",
                       description="Classify an image file, a folder of images or a sample "
                                   "photo (coffee, chelsea, rocket, astronaut, ...).")
    add_model_args(p)
    add_image_arg(p)
    p.add_argument("--topk", type=positive_int, default=5, help="how many classes (default 5)")
    add_json(p)
    p.set_defaults(func=cmd_predict)
