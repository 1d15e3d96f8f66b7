"""`circuitlab circuit --image DIR --target CLASS`: the circuit a class's images share, read on
most of them and tested on the rest (``circuits.class_circuit``)."""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

from ..errors import CircuitlabError
from ..files import locked, refuse_overwrite, staged, write_text
from ._common import bars_on, emit, load, provenance, target_index

OUTPUTS = ("nodes.csv", "edges.csv", "nodes.parquet", "edges.parquet", "circuit.graphml",
           "circuit.json", "circuit.png", "circuit.html", "units.csv", "per_image.csv",
           "validation.csv", "validation.json")


def _images(args, hm, files):
    """The folder's images as one batch, read through the DataLoader; unreadable files are
    skipped with a warning each."""
    import torch

    from ..runs import batches, default_workers
    xs, used = [], []
    workers = default_workers() if args.workers is None else args.workers
    for batch in batches(files, hm.data_config, args.batch_size, workers):
        for i, x, error in batch:
            if x is None:
                warnings.warn(f"skipped: {error}")
            else:
                xs.append(x)
                used.append(files[i])
    if not xs:
        raise CircuitlabError(f"no readable image in {args.image}")
    return torch.stack(xs).to(hm.device), used


def cmd_class_circuit(args) -> int:
    from tqdm.auto import tqdm

    from .. import data
    from ..circuits import class_circuit
    out = Path(args.out)
    refuse_overwrite([out / n for n in OUTPUTS], args.force)
    if args.explain or args.explanation:
        raise CircuitlabError("a class circuit is read on the images themselves; drop "
                              "--explain / --explanation")
    files = data.image_files(args.image)
    with locked(out):
        hm = load(args)
        target = target_index(hm, args.target)
        x, used = _images(args, hm, files)
        refs = args.refs_of(hm).to(x.device)
        with tqdm(total=len(used), desc="class circuit", unit="img", file=sys.stderr,
                  disable=not bars_on(args) or None) as bar:
            cc = class_circuit(hm, x, target, held_out=args.held_out, min_share=args.min_share,
                               config=args.readout, reference=refs, seed=args.seed,
                               progress=lambda done, n: bar.update(done - bar.n))
        name = {i: str(f) for i, f in enumerate(used)}
        summary = {"model": hm.name, "label": hm.label(target), **cc.summary(),
                   "images": [str(f) for f in used], **provenance(args, hm)}
        with staged(out, OUTPUTS) as tmp:
            cc.circuit.save(tmp)
            if args.figures:
                cc.circuit.plot(tmp / "circuit.png")
                cc.circuit.to_html(tmp / "circuit.html")
            write_text(tmp / "units.csv", cc.units.to_csv(index=False))
            for table, df in (("per_image", cc.per_image), ("validation", cc.validation)):
                write_text(tmp / f"{table}.csv",
                           df.assign(image=df["image"].map(name)).to_csv(index=False))
            write_text(tmp / "validation.json", json.dumps(summary, indent=2) + "\n")
    s = summary
    emit(args, s, f"{s['label']}: class circuit of {s['units']} units (chosen on >= "
                  f"{args.min_share:.0%} of {s['fit_images']} images; mean Jaccard with "
                  f"theirs {s['mean_jaccard']:.2f}); on {s['held_out_images']} held-out "
                  f"images it keeps contrast {s['held_out_contrast']:.2f} (random circuits "
                  f"of its size {s['held_out_random_contrast']:.2f}), top-1 kept "
                  f"{s['held_out_top1_kept']:.0%}, removed: top-1 kept "
                  f"{s['held_out_removed_top1_kept']:.0%}\nwrote {out}")
    return 0
