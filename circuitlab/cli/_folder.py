"""A command over a folder of images (`explain`, `circuit`, `saliency` with --image DIR):
batches streamed through a DataLoader, one sub-folder per image written whole, one results
table, resume, a lock, and the failures listed at the end (``circuitlab.runs``)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from ..files import locked, refuse_overwrite, staged
from ._common import bars_on, emit, load

# flags that change how a run goes (or only what it draws), not what it finds: a rerun
# may change them and resume
_HOW = {"out", "force", "json", "image", "func", "batch_size", "workers", "debug", "device",
        "explainer_obj", "one_image", "figures"}


def settings(args) -> dict:
    """What the results depend on, as run.json records it."""
    return {k: v for k, v in sorted(vars(args).items())
            if k not in _HOW and (v is None or isinstance(v, (bool, int, float, str)))}


def run_folder(args, command: str, outputs, required, work: Callable,
               summary: Callable) -> int:
    """``work(hm, [(image, x, publish)], args)`` on batches of the pending images;
    ``publish(image, write)`` runs ``write(folder)`` into the image's sub-folder. Under
    torchrun each rank takes its shard and rank 0 merges the tables and reports.
    Exit status 1 when some image failed (the others are done), 0 otherwise."""
    from .. import data
    from ..distributed import barrier, local_device, process_group, rank_and_world
    from ..runs import FolderRun
    images = data.image_files(args.image)
    rank, world = rank_and_world()
    args.device = local_device(args.device)
    run = FolderRun(args.out, images, command, settings(args), outputs, required, args.force,
                    rank, world)
    run.check()                                  # before the model loads
    with process_group(args.device), locked(run.out if world == 1 else
                                            run.out / f"rank{rank}"):
        pending = run.start()
        todo = run.shard(pending)
        try:
            _work_through(run, todo, command, work, args)
        except BaseException:   # interrupted: the table lists every image done (a run that
            run.flush()         # ends merges tables and journals into it instead)
            raise
        barrier()
        if rank == 0:
            run.merge()
    if rank != 0:
        return 1 if run.failed() else 0
    rows = [run.rows[str(i)] for i in images if str(i) in run.rows]
    done_now = {str(i) for i in pending}
    failed = run.failed()
    lines = [summary([r]) if r["status"] == "ok" else f"{r['image']}: failed: {r['error']}"
             for r in rows if r["image"] in done_now]
    lines.append(f"{len(pending) - len(failed)} done, {len(images) - len(pending)} already "
                 f"done earlier, {len(failed)} failed; wrote {run.out} (results.csv)")
    emit(args, {"out": str(run.out), "done": len(pending) - len(failed),
                "skipped": len(images) - len(pending),
                "failed": [{"image": r["image"], "error": r["error"]} for r in failed],
                "results": rows}, "\n".join(lines))
    return 1 if failed else 0


def run_one(args, outputs, work: Callable) -> dict:
    """``work(hm, [(image, x, publish)], args)`` on the one image --image names, its result
    written into --out as a whole: refused if its outputs exist (unless --force), --out
    locked while it runs. Returns the result."""
    from .. import data
    out = Path(args.out)
    refuse_overwrite([out / n for n in outputs], args.force)
    args.one_image = True      # bars over its steps (a folder run has one over images)
    results = []

    def publish(image, write):
        with staged(out, outputs) as tmp:
            results.append(write(tmp))
    with locked(out):
        hm = load(args)
        work(hm, [(args.image, data.load_image(args.image, hm), publish)], args)
    return results[0]


def _work_through(run, todo: list, command: str, work: Callable, args) -> None:
    """This process's images, in batches from the DataLoader, with a progress bar."""
    from tqdm.auto import tqdm

    from ..runs import batches, default_workers
    if not todo:
        return
    hm = load(args)
    workers = default_workers() if args.workers is None else args.workers
    with tqdm(total=len(todo), desc=command, unit="img", file=sys.stderr,
              disable=len(todo) < 2 or not bars_on(args) or None) as bar:
        for batch in batches(todo, hm.data_config, args.batch_size, workers,
                             pin_memory=hm.device.type == "cuda"):
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
