"""A command over a folder of images (`explain`, `circuit`, `saliency` with --image DIR):
batches streamed through a DataLoader, one sub-folder per image written whole, one results
table, resume, a lock, and the failures listed at the end (``circuitlab.runs``)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from ..files import locked
from ._common import emit, load

# flags that change how a run goes, not what it finds: a rerun may change them and resume
_HOW = {"out", "force", "json", "image", "func", "batch_size", "workers", "debug", "device",
        "explainer_obj"}


def settings(args) -> dict:
    """What the results depend on, as run.json records it."""
    return {k: v for k, v in sorted(vars(args).items())
            if k not in _HOW and (v is None or isinstance(v, (bool, int, float, str)))}


def run_folder(args, command: str, outputs, required, work: Callable,
               summary: Callable) -> int:
    """``work(hm, [(image, x, publish)], args)`` on batches of the pending images;
    ``publish(image, write)`` runs ``write(folder)`` into the image's sub-folder.
    Exit status 1 when some image failed (the others are done), 0 otherwise."""
    from tqdm.auto import tqdm

    from .. import data
    from ..runs import FolderRun, batches, default_workers
    images = data.image_files(args.image)
    run = FolderRun(args.out, images, command, settings(args), outputs, required, args.force)
    run.check()                                  # before the model loads
    with locked(run.out):
        todo = run.start()
        skipped = len(images) - len(todo)
        hm = load(args) if todo else None
        workers = default_workers() if args.workers is None else args.workers
        with tqdm(total=len(todo), desc=command, unit="img", file=sys.stderr,
                  disable=len(todo) < 2 or None) as bar:
            for batch in (batches(todo, hm.data_config, args.batch_size, workers,
                                  pin_memory=hm.device.type == "cuda") if todo else ()):
                items = []
                for i, x, error in batch:
                    if x is None:
                        run.record(todo[i], error=error)
                    else:
                        items.append((todo[i], x[None].to(hm.device, non_blocking=True),
                                      run.publish))
                if items:
                    work(hm, items, args)
                bar.update(len(batch))
    rows = [run.rows[str(i)] for i in images if str(i) in run.rows]
    failed = run.failed()
    lines = [summary([r]) if r["status"] == "ok" else f"{r['image']}: failed: {r['error']}"
             for r in rows if Path(r["image"]) in set(todo)]
    lines.append(f"{len(todo) - len(failed)} done, {skipped} already done earlier, "
                 f"{len(failed)} failed; wrote {run.out} (results.csv)")
    emit(args, {"out": str(run.out), "done": len(todo) - len(failed), "skipped": skipped,
                "failed": [{"image": r["image"], "error": r["error"]} for r in failed],
                "results": rows}, "\n".join(lines))
    return 1 if failed else 0
