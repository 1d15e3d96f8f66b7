"""Per-image explanation speed and quality.

    python benchmarks/explain.py            # Lite0 photos at 224 px + the synthetic benchmark
    python benchmarks/explain.py --quick    # fewer images and steps, a smoke run

Reports seconds per image, the cost of one optimisation step relative to one forward+backward
of the classifier alone (batch 1, and the batch a step actually runs: e, backgrounds,
complement), and the quality numbers of the explanations issue. Prints tables, writes CSV
(default benchmarks/results/explain.csv). The amortized mode is not written yet.
"""
from __future__ import annotations

import argparse
import io
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import circuitlab as cl  # noqa: E402
from circuitlab import metrics, synthetic  # noqa: E402
from circuitlab.explain import explain  # noqa: E402
from circuitlab.zoo import write_atomic  # noqa: E402


def fwd_bwd_seconds(hm, x, reps=5):
    def once():
        xi = x.clone().requires_grad_(True)
        hm.model(xi).sum().backward()
    once()
    t = time.perf_counter()
    for _ in range(reps):
        once()
    return (time.perf_counter() - t) / reps


def photos(steps, names):
    hm = cl.load_model("efficientnet_lite0")
    rows = []
    for name in names:
        x = cl.data.load_image(name, hm)
        ex = explain(hm, x, steps=steps)
        cfg = ex.config
        r = metrics.evaluate_mask(hm, x, ex.mask, ex.target)
        per_step_batch = 1 + (cfg.backgrounds_per_step if cfg.rob else 0) + (1 if cfg.nec else 0)
        step = ex.seconds / ex.steps
        rows.append({
            "image": name, "label": hm.label(int(ex.target)), "seconds": ex.seconds,
            "steps": ex.steps, "step_ms": step * 1e3,
            "step_vs_fwd_bwd_b1": step / fwd_bwd_seconds(hm, x),
            "step_vs_fwd_bwd_same_batch": step / fwd_bwd_seconds(
                hm, x.repeat(per_step_batch, 1, 1, 1)),
            "top1_kept": bool(r["top1_kept"][0]), "area_fraction": float(r["area_fraction"][0]),
            "necessity_drop": float(r["necessity_drop"][0]),
            "confidence_image": float(r["confidence_image"][0]),
            "confidence_explanation": float(r["confidence_explanation"][0])})
    return pd.DataFrame(rows)


def benchmark_quality(kind, n, steps):
    hm = synthetic.synthetic_model(kind, log=lambda s: print(s, file=sys.stderr))
    data = synthetic.make_dataset(n, seed=123)
    x = data.normalized()
    t = time.perf_counter()
    ex = explain(hm, x, steps=steps)
    seconds = time.perf_counter() - t
    r = metrics.evaluate_mask(hm, x, ex.mask, ex.target)
    obj = data.masks.flatten(1).mean(1)
    return {"model": f"synthetic {kind}", "images": n, "seconds_per_image": seconds / n,
            "top1_kept": float(r["top1_kept"].float().mean()),
            "pointing_game": float(metrics.pointing_game(ex.soft, data.masks).float().mean()),
            "mask_precision": float(metrics.mask_precision(ex.mask, data.masks).mean()),
            "iou": float(metrics.iou(ex.mask, data.masks).mean()),
            "area_over_object": float((ex.area.cpu() / obj).mean()),
            "necessity_drop": float(r["necessity_drop"].mean()),
            "sufficiency": float(r["sufficiency"].mean())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "explain.csv"))
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    steps = 5 if args.quick else None
    ph = photos(steps, ["coffee"] if args.quick else ["coffee", "chelsea", "rocket"])
    q = pd.DataFrame([benchmark_quality(k, 8 if args.quick else 64, steps)
                      for k in ("cnn",)] +
                     ([] if args.quick else [benchmark_quality("vit", 64, steps)]))
    with pd.option_context("display.width", 160, "display.float_format", "{:.3f}".format):
        print("EfficientNet-Lite0, per-image mode, default preset")
        print(ph.to_string(index=False))
        print("\nsynthetic ground-truth benchmark, per-image mode, default preset")
        print(q.to_string(index=False))
    buf = io.StringIO()
    pd.concat([ph.assign(table="photos"), q.assign(table="synthetic")]).to_csv(buf, index=False)
    write_atomic(args.out, lambda f: f.write(buf.getvalue().encode()))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
