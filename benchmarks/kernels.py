"""Fused kernels against eager torch and torch.compile, on a GPU.

    python benchmarks/kernels.py                 # the full table (needs CUDA), ~5 min on an H100
    python benchmarks/kernels.py --quick         # small shapes; on a CPU under the interpreter

- activation matching: forward+backward of the multi-layer loss at the tap layers of ResNet-50
  (stem, layer1-4: cosine, cosine, zmse, zmse, zmse; alphas 1, 2, 2, 4, 8) and ViT-B/16 (blocks
  3, 7, 11: cosine), batch 1 to 64, fp32 and bf16; each distance alone on the ResNet-50 taps.
  GB/s counts the bytes that must move (read phi(x) and phi(e), write d/d phi(e)); the copy
  bandwidth of the same GPU is measured in the same run. Targets (H100): >= 3x eager,
  >= 1.3x torch.compile, >= 70 % of copy bandwidth. ``triton`` launches one kernel per
  layer, ``triton-one`` one kernel for all layers (a table of their pointers).
- edge scoring: all-pairs ||W_{d,s}||_1 x E_s for real layer shapes, and the fused top-16 per
  destination, against the torch reference.
- one explanation step end to end (objective forward+backward and the optimiser step) on
  ResNet-50 at 224 px (random weights: timing only), with and without the kernels.
Prints tables and writes CSV (default benchmarks/results/kernels.csv).
"""
from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

import torch

if not torch.cuda.is_available():          # Triton on a CPU only runs under its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pandas as pd  # noqa: E402

import circuitlab.kernels as kernels  # noqa: E402
from _common import report, run_benchmark, start  # noqa: E402
from circuitlab.kernels import reference as R  # noqa: E402

RESNET50 = [(64, 112), (256, 56), (512, 28), (1024, 14), (2048, 7)]      # (C, side)
RESNET50_KINDS = ("cosine", "cosine", "zmse", "zmse", "zmse")
RESNET50_ALPHAS = (1.0, 2.0, 2.0, 4.0, 8.0)
VITB = [(197, 768)] * 3
QUICK_CNN = [(8, 12), (16, 6), (24, 3)]


class Deadline:
    def __init__(self, seconds):
        self.end = time.perf_counter() + seconds

    def left(self):
        return self.end - time.perf_counter()


def timer(fn, device, grad_to_none=None, reps=20):
    """Median seconds of fn(): CUDA events via triton's do_bench (L2 flushed) on a GPU."""
    if device == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=5, rep=max(20, reps * 5), grad_to_none=grad_to_none,
                        return_mode="median") / 1e3
    times = []
    for _ in range(max(2, reps // 5)):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device):
    n = (1 << 28) if device == "cuda" else (1 << 20)             # 1 GiB of fp32 on a GPU
    a = torch.empty(n, device=device)
    b = torch.empty_like(a)
    t = timer(lambda: b.copy_(a), device)
    return 2 * a.numel() * a.element_size() / t


def make_acts(spec, batch, dtype, device, conv=True, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    xs, es = [], []
    for c, s in spec:
        shape = (batch, c, s, s) if conv else (batch, c, s)     # tokens: (B, N=c, C=s)
        a = torch.randn(shape, device=device, generator=g).to(dtype)
        xs.append(a)
        es.append((a + 0.5 * torch.randn(shape, device=device, generator=g).to(dtype))
                  .requires_grad_(True))
    return xs, es


def loss_bytes(xs, es):
    return sum(a.numel() * a.element_size() + 2 * b.numel() * b.element_size()
               for a, b in zip(xs, es))


def bench_matching(label, xs, es, alphas, kinds, cdims, device, methods, copy_bw, dl):
    rows = []
    fns = {"eager": lambda: R.activation_matching(xs, es, alphas, kinds, cdims),
           "triton": lambda: kernels.activation_matching(xs, es, alphas, kinds, cdims,
                                                         backend="triton"),
           "triton-one": lambda: kernels.activation_matching(xs, es, alphas, kinds, cdims,
                                                             backend="triton", launch="one")}
    with torch.no_grad():
        ref = float(fns["eager"]())
        got = {m: float(f()) for m, f in fns.items() if m in methods}
    for m in methods:
        if dl.left() < 20:
            print(f"  skipped {label} {m}: out of time")
            continue
        if m == "compile":
            torch._dynamo.reset()       # a fresh graph per case: no recompile-limit fallback
            cf = torch.compile(R.activation_matching, dynamic=False)
            fn = lambda: cf(xs, es, alphas, kinds, cdims)          # noqa: E731
            t0 = time.perf_counter()
            fn().backward()                                         # compile outside timing
            compile_s = time.perf_counter() - t0
        else:
            fn, compile_s = fns[m], 0.0
        t = timer(lambda: fn().backward(), device, grad_to_none=es)
        rows.append({"op": "activation_matching", "case": label, "method": m,
                     "seconds": t, "GB/s": loss_bytes(xs, es) / t / 1e9,
                     "copy_frac": loss_bytes(xs, es) / t / copy_bw, "compile_s": compile_s,
                     "rel_diff_vs_eager": abs(got.get(m, ref) - ref) / max(1e-12, abs(ref))})
    base = {r["method"]: r["seconds"] for r in rows}
    for r in rows:
        r["x_eager"] = base.get("eager", float("nan")) / r["seconds"]
        r["x_compile"] = base.get("compile", float("nan")) / r["seconds"]
    return rows


def bench_edges(device, quick):
    torch.manual_seed(0)
    cases = [("conv3x3 512x512 (ResNet-50 layer4)", (512, 512, 3, 3), 1),
             ("conv1x1 2048<-512 (ResNet-50 layer4)", (2048, 512, 1, 1), 1),
             ("depthwise 960 (MobileNetV3)", (960, 1, 5, 5), 960),
             ("linear 1000<-2048 (fc)", (1000, 2048), 1)]
    if quick:
        cases = [("conv3x3 24x16", (24, 16, 3, 3), 1), ("depthwise 16", (16, 1, 3, 3), 16)]
    rows = []
    for label, shape, groups in cases:
        w = torch.randn(shape, device=device)
        cin = shape[1] * groups
        e = torch.rand(cin, device=device)
        src, dst = list(range(cin)), list(range(shape[0]))
        for topk in (None, 16):
            tr = timer(lambda: R.edge_scores(w, e, src, dst, groups, topk=topk), device,
                       reps=5)
            tt = timer(lambda: kernels.edge_scores(w, e, src, dst, groups, topk=topk,
                                                   backend="triton"), device, reps=5)
            a = R.edge_scores(w, e, src, dst, groups, topk=topk)
            b = kernels.edge_scores(w, e, src, dst, groups, topk=topk, backend="triton")
            rows.append({"op": "edge_scores", "case": f"{label}{', top-16' if topk else ''}",
                         "method": "triton", "seconds": tt, "torch_seconds": tr,
                         "x_eager": tr / tt,
                         "max_abs_diff": float((a[0] - b[0]).abs().max())})
    return rows


def bench_explain_step(device, dl, quick):
    import circuitlab as cl
    from circuitlab.explain.config import preset
    from circuitlab.explain.generator import MaskGrid
    from circuitlab.explain.objective import Objective
    rows = []
    name, size = ("resnet18", 64) if quick else ("resnet50", 224)
    warnings.filterwarnings("ignore")
    hm = cl.load_model(name, pretrained=False, device=device,
                       data_config={"input_size": (3, size, size)})
    for batch in ((1,) if quick else (1, 16)):
        x = torch.randn(batch, 3, size, size, device=device)
        cfg = preset("default", hm.family.name, size)
        net = MaskGrid((batch, 1, cfg.mask_size, cfg.mask_size), seed=0).to(device)
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
        obj = Objective(hm, x, cfg)
        result = {}
        for mode in ("torch", "triton"):
            if dl.left() < 20:
                continue
            os.environ["CIRCUITLAB_KERNELS"] = mode

            def step():
                loss, _, _ = obj(torch.sigmoid(net(x)))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            step()
            result[mode] = timer(step, device, reps=5)
        os.environ.pop("CIRCUITLAB_KERNELS", None)
        if len(result) == 2:
            rows.append({"op": "explain_step", "case": f"{name} {size}px batch {batch}",
                         "method": "triton", "seconds": result["triton"],
                         "torch_seconds": result["torch"],
                         "x_eager": result["torch"] / result["triton"]})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shapes (CPU: interpreter)")
    p.add_argument("--budget-s", type=float, default=420, help="skip what does not fit")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernels.csv"))
    args = p.parse_args(argv)
    start(args.out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.quick:
        print("the kernel benchmark needs a CUDA GPU; run with --quick for a CPU smoke run "
              "under the Triton interpreter")
        return 2
    dl = Deadline(args.budget_s)
    # triton: one launch per layer; triton-one: one launch for all layers (a pointer table)
    methods = ["eager", "triton", "triton-one"] + ([] if args.no_compile or device == "cpu"
                                                   else ["compile"])
    copy_bw = copy_bandwidth(device)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device: {gpu}; copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write)")
    rows = []
    cnn = QUICK_CNN if args.quick else RESNET50
    vit = [(17, 32)] * 3 if args.quick else VITB
    batches = (2,) if args.quick else (1, 8, 64)
    dtypes = (torch.float32,) if args.quick else (torch.float32, torch.bfloat16)
    kinds5 = RESNET50_KINDS[:len(cnn)]
    for dtype in dtypes:
        dn = str(dtype).split(".")[-1]
        for batch in batches:
            xs, es = make_acts(cnn, batch, dtype, device)
            rows += bench_matching(f"resnet50 taps b{batch} {dn}", xs, es,
                                   RESNET50_ALPHAS[:len(cnn)], kinds5, [1] * len(cnn),
                                   device, methods, copy_bw, dl)
            xs, es = make_acts(vit, batch, dtype, device, conv=False)
            rows += bench_matching(f"vit-b taps b{batch} {dn}", xs, es, (1.0, 2.0, 8.0),
                                   ("cosine",) * 3, [2] * 3, device, methods, copy_bw, dl)
            del xs, es
    xs, es = make_acts(cnn, 2 if args.quick else 16, torch.float32, device)
    for kind in R.DISTANCES:
        rows += bench_matching(f"resnet50 taps b{xs[0].shape[0]} fp32, {kind} only", xs, es,
                               RESNET50_ALPHAS[:len(cnn)], (kind,) * len(cnn), [1] * len(cnn),
                               device, ["eager", "triton", "triton-one"], copy_bw, dl)
    del xs, es
    rows += bench_edges(device, args.quick)
    if dl.left() > 30:
        rows += bench_explain_step(device, dl, args.quick)
    df = pd.DataFrame(rows)
    df.insert(0, "device", gpu)
    show = [c for c in ("op", "case", "method", "seconds", "x_eager", "x_compile", "GB/s",
                        "copy_frac", "compile_s", "rel_diff_vs_eager", "max_abs_diff")
            if c in df]
    report(df, args.out, show, float_format="{:.4g}")
    return 0


if __name__ == "__main__":
    run_benchmark(main)
