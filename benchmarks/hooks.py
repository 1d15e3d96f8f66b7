"""Overhead of HookedModel.run_with_cache against plain torch forward hooks and a bare forward.

    python benchmarks/hooks.py                  # ResNet-50 and ViT-S, batch 1 and 32, CPU
    python benchmarks/hooks.py --quick          # tiny shapes, a smoke run
    python benchmarks/hooks.py --device cuda

Target: run_with_cache <= 1.10x plain forward hooks recording the same activations. Methods are
timed round-robin (one rep of each in turn) so machine drift hits all of them alike; ratios use
the fastest rep of each (medians are reported beside them). Prints a table and writes CSV (default benchmarks/results/hooks.csv).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import torch

from circuitlab import HookedModel  # noqa: E402
from _common import report, run_benchmark, start  # noqa: E402

CONFIGS = {
    "full": [("resnet50", {}, 224), ("vit_small_patch16_224", {}, 224)],
    "quick": [("resnet18", {}, 64),
              ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 4}, 32)],
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_forward(model, x):
    return model(x)


def torch_hooks(model, x, names):
    modules = dict(model.named_modules())
    store = {}
    handles = [modules[n].register_forward_hook(
        lambda m, a, o, n=n: store.__setitem__(n, o)) for n in names]
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, store


def measure(arch, kwargs, size, batch, reps, device):
    import timm
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, **kwargs).eval().to(device)
    plain = copy.deepcopy(model)  # never wrapped by nnsight: the true bare forward
    hm = HookedModel(model, name=arch, data_config={"input_size": (3, size, size)})
    x = torch.randn(batch, 3, size, size, device=device)
    name_sets = {"taps": list(hm.taps), "blocks": list(hm.family.blocks)}
    methods = {"bare forward": lambda: bare_forward(plain, x)}
    for label, names in name_sets.items():
        methods[f"torch hooks ({label})"] = lambda names=names: torch_hooks(plain, x, names)
        methods[f"run_with_cache ({label})"] = lambda names=names: hm.run_with_cache(x, names)
    times = {k: [] for k in methods}
    with torch.no_grad():
        for _ in range(2):  # warm-up
            for fn in methods.values():
                fn()
        for _ in range(reps):
            for k, fn in methods.items():
                _sync(device)
                t = time.perf_counter()
                fn()
                _sync(device)
                times[k].append(time.perf_counter() - t)
    # The minimum is the least noisy estimate of a fixed overhead on a shared 2-core machine;
    # the median is kept beside it.
    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for k in times:
        label = k[k.find("(") + 1:-1] if "(" in k else ""
        hooks = f"torch hooks ({label})" if label else None
        rows.append({"model": arch, "batch": batch, "device": str(device), "method": k,
                     "hook_points": len(name_sets.get(label, [])),
                     "min_ms": best[k] * 1e3, "median_ms": med[k] * 1e3,
                     "vs_bare": best[k] / best["bare forward"],
                     "vs_torch_hooks": best[k] / best[hooks] if hooks else float("nan"),
                     "vs_torch_hooks_median": med[k] / med[hooks] if hooks else float("nan"),
                     "reps": reps})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny models and shapes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--reps", type=int, default=0, help="timed reps (default 20 at batch 1, "
                                                        "7 above)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "hooks.csv"))
    args = p.parse_args(argv)
    start(args.out, args.device)
    device = torch.device(args.device)
    warnings.filterwarnings("ignore")
    rows = []
    for arch, kwargs, size in CONFIGS["quick" if args.quick else "full"]:
        for batch in [int(b) for b in args.batches.split(",")]:
            reps = args.reps or (20 if batch == 1 else 7)
            rows += measure(arch, kwargs, size, batch, reps, device)
            print(f"done {arch} batch {batch}", file=sys.stderr, flush=True)
    df = pd.DataFrame(rows)
    report(df, args.out, [c for c in df if c not in ("device", "reps")],
           note=f" (device {device}, torch threads {torch.get_num_threads()})")
    return 0


if __name__ == "__main__":
    run_benchmark(main)
