"""`circuitlab train-explainer`: distil per-image masks into a U-Net that explains in one
forward."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from ..errors import CircuitlabError
from ..files import locked, refuse_overwrite
from ._common import (add_model_args, add_outputs, add_seed, bars_on, emit, load,
                      positive_int)


def _training_images(args, hm):
    """(N, C, H, W) normalised inputs: a folder, the offline sample photos, or the synthetic
    benchmark's training images."""
    import torch

    from .. import data
    if args.data == "synthetic":
        from .. import synthetic
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


def _progress_bars():
    """A tqdm bar per phase (teacher masks, then distillation) and the callback feeding them."""
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
    return bars, progress


def cmd_train_explainer(args) -> int:
    from ..distributed import local_device, process_group, rank_and_world
    from ..explain import train_explainer
    out = Path(args.out)
    if out.exists() and not (args.force or args.resume):
        raise CircuitlabError(f"{str(out)!r} exists; pass --resume to continue it or --force "
                              f"to start over")
    if args.resume and not out.exists():
        raise CircuitlabError(f"--resume: {str(out)!r} does not exist yet")
    refuse_overwrite([out], force=True)   # a folder, a path under a file, unwritable: now
    rank, world = rank_and_world()
    args.device = local_device(args.device)
    with process_group(args.device), locked(out if world == 1 else
                                            out.with_name(f"{out.name}.rank{rank}")):
        hm = load(args)
        images = _training_images(args, hm).to(hm.device)
        bars, progress = _progress_bars() if rank == 0 and bars_on(args) else ({}, None)
        t0 = time.perf_counter()
        ex = train_explainer(hm, images, steps=args.steps, batch_size=args.batch_size,
                             teacher_steps=args.teacher_steps, seed=args.seed, checkpoint=out,
                             resume=args.resume, overwrite=args.force, progress=progress)
        for bar in bars.values():
            bar.close()
    if rank != 0:
        return 0
    result = {"model": hm.name, "explainer": str(out), "images": len(images),
              "steps": ex.step, "final_loss": ex.history[-1]["loss"] if ex.history else None,
              "seconds": time.perf_counter() - t0}
    emit(args, result, f"trained an amortized explainer for {hm.name} on {len(images)} "
                       f"images ({ex.step} steps, loss {result['final_loss']:.3f}, "
                       f"{result['seconds']:.0f} s); wrote {out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("train-explainer", help="train an amortized explainer over images",
                       description="Explain every training image per image (the teacher), "
                                   "then train a mask U-Net to reproduce those masks in one "
                                   "forward. Checkpoints are written atomically as training "
                                   "goes; --resume continues one.")
    add_model_args(p)
    p.add_argument("--data", "-d", required=True,
                   help="folder of images, 'samples' (the offline photos) or 'synthetic' "
                        "(the ground-truth benchmark's training images)")
    p.add_argument("--images", type=positive_int, default=None,
                   help="use this many images (synthetic: how many to generate, default 512)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="U-Net training steps (default 600)")
    p.add_argument("--teacher-steps", type=positive_int, default=None,
                   help="per-image steps for the teacher masks (the preset's by default)")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="global batch (default 32); under torchrun each of N processes takes "
                        "1/N of it, so it must divide by N")
    add_seed(p)
    p.add_argument("--resume", action="store_true", help="continue the checkpoint at --out")
    add_outputs(p, "explainer checkpoint file to write", "start over, replacing --out")
    p.set_defaults(func=cmd_train_explainer)
