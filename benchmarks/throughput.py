"""Dataset-run throughput: images per second of `explain`, `circuit` and `saliency` over one
folder, one image at a time vs batched vs several processes (torchrun), as a user runs them.

    python benchmarks/throughput.py                  # CPU: synthetic CNN, 64 images
    python benchmarks/throughput.py --quick          # 8 images, batches 1 and 4
    python benchmarks/throughput.py --device cuda --model efficientnet_lite0
                                                     # GPU: 256 images, batches 1 / 16 / 64 /
                                                     # 256, fp32 vs bf16, eager vs CUDA
                                                     # graphs, every visible GPU (torchrun)

Each row is one command over the same folder (64 of the synthetic benchmark's held-out
images, written as PNG), timed wall-clock from the command's start to its end (model load
and process start included, as a user waits for them; a compiled run pays its compilation).
On a GPU the one-at-a-time rows run the first 16 images only (the rate is per image).
``same_masks``: the share of the images whose mask.png is byte-identical to the
one-at-a-time run's. Extremal perturbations
(our implementation) one at a time is the anchor row. Prints the table, writes CSV (default
benchmarks/results/throughput.csv).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from _common import report, run_benchmark, start
from circuitlab import synthetic
from circuitlab.files import write_text

COMMANDS = {   # name -> CLI arguments after the folder (defaults otherwise)
    # per-image mode named: on photo-sized inputs (Lite0) the default is the region search,
    # which scores one image's sets at a time instead of optimising a batch together
    "explain": ["explain", "--mode", "per-image"],
    "explain --no-minimal": ["explain", "--no-minimal"],
    "circuit": ["circuit"],
    # the tables, graph and validation without circuit.png / circuit.html
    "circuit --no-figures": ["circuit", "--no-figures"],
    "saliency gradcam": ["saliency", "--method", "gradcam"],
    "saliency extremal (anchor)": ["saliency", "--method", "extremal"],
}


def make_folder(n: int, where: Path) -> Path:
    folder = where / "images"
    folder.mkdir()
    for i, img in enumerate(synthetic.make_dataset(n, seed=123).images):
        arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img{i:03d}.png")
    return folder


def subset(folder: Path, n: int) -> Path:
    """The first ``n`` images of ``folder``, as a folder of their own."""
    small = folder.parent / f"{folder.name}_{n}"
    if not small.exists():
        small.mkdir()
        for f in sorted(folder.iterdir())[:n]:
            (small / f.name).write_bytes(f.read_bytes())
    return small


def plans(name: str, batches: list, n: int, procs: int, gpu: bool, quick: bool) -> list:
    """(batch, processes, precision, compile) rows of one command: only explain optimises a
    batch together and has precision and compile settings; the others run image by image, so
    one batched row shows what the loader alone changes."""
    if "anchor" in name:
        return [(1, 1, "fp32", "off")]
    sizes = [b for b in (batches if name.startswith("explain") else batches[:1] + batches[2:3])
             if b <= n]
    out = [(b, 1, "fp32", "off") for b in sizes]
    if gpu and name.startswith("explain"):
        big = sizes[-2:]
        out += [(b, 1, "bf16", "off") for b in big] + [(big[0], 1, "fp32", "reduce-overhead"),
                                                       (big[-1], 1, "bf16", "reduce-overhead")]
    if procs > 1 and not quick:
        out.append((sizes[-1], procs, "fp32", "off"))
    return out


def run(command: list, folder: Path, out: Path, batch: int, procs: int, device: str,
        model: str, precision: str = "fp32", compile: str = "off") -> float:
    cli = ["-m", "circuitlab", command[0], "--model", model, "--image", str(folder),
           "--out", str(out), "--batch-size", str(batch), "--workers", "0", *command[1:]]
    if precision != "fp32" or compile != "off":
        cli += ["--precision", precision, "--compile", compile]
    if device != "cpu":
        cli += ["--device", device]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if procs > 1:
        cli = ["-m", "torch.distributed.run", "--nproc_per_node", str(procs), *cli]
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // procs))
    t = time.perf_counter()
    done = subprocess.run([sys.executable, *cli], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cli)} failed: {done.stderr.strip()[-500:]}")
    return seconds


def same_masks(a: Path, b: Path) -> float:
    masks = sorted(a.glob("*/mask.png"))
    if not masks:
        return float("nan")
    return sum((b / m.parent.name / m.name).read_bytes() == m.read_bytes()
               for m in masks) / len(masks)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--images", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="synthetic-cnn",
                   help="synthetic-cnn (default) or efficientnet_lite0 (the GPU target's model; "
                        "the folder's 32 px images are resized to its 224 px)")
    p.add_argument("--commands", default=None,
                   help="comma-separated subset of: " + ", ".join(COMMANDS))
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "throughput.csv"))
    args = p.parse_args(argv)
    start(args.out, args.device)
    gpu = args.device != "cpu"
    n = args.images or (8 if args.quick else 256 if gpu else 64)
    batches = [1, 4] if args.quick else ([1, 16, 64, 256] if gpu else [1, 4, 16, 64])
    procs = 2 if not gpu else torch.cuda.device_count()
    names = args.commands.split(",") if args.commands else list(COMMANDS)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_folder(n, Path(tmp))
        for name in names:
            first = None
            extra = ["--reference", "synthetic"] if name.startswith("circuit") and \
                args.model.startswith("synthetic") else []
            for batch, k, precision, comp in plans(name, batches, n, procs, gpu, args.quick):
                out = Path(tmp) / f"{name.replace(' ', '_')}-b{batch}-p{k}-{precision}-{comp}"
                m = min(n, 16) if gpu and batch == 1 and k == 1 else n
                s = run(COMMANDS[name] + extra, subset(folder, m) if m < n else folder, out,
                        batch, k, args.device, args.model, precision, comp)
                first = first or out
                rows.append({"command": name, "model": args.model, "device": args.device,
                             "batch": batch, "processes": k, "precision": precision,
                             "compile": comp, "images": m, "seconds": s,
                             "images_per_s": m / s, "same_masks": same_masks(first, out)})
                print(f"{name:28s} batch {batch:3d} x{k} {precision} {comp}: {m / s:6.2f} "
                      f"img/s", file=sys.stderr)
                # rows so far, written after each: a run cut short by a time limit keeps them
                write_text(args.out, table(rows).to_csv(index=False))
    report(table(rows), args.out, float_format="{:.2f}")
    return 0


def table(rows: list) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    one = df[(df["batch"] == 1) & (df["processes"] == 1) & (df["precision"] == "fp32") &
             (df["compile"] == "off")].set_index("command")["images_per_s"]
    df["vs_one_at_a_time"] = df["images_per_s"] / df["command"].map(one)
    return df


if __name__ == "__main__":
    run_benchmark(main)
