"""Circuit readout and patching speed.

    python benchmarks/circuits.py            # Lite0 at 224 px and the synthetic CNN
    python benchmarks/circuits.py --quick    # synthetic CNN only, fewer reps

- readout: ``read_circuit`` (k units per tapped layer, weight edges where a conv reads the
  previous tap, effective edges elsewhere, feature-to-class links) relative to one
  forward+backward of the model at batch 1. Target <= 3x.
- default readout: the smallest faithful circuit (ranking rounds + size search against 8
  reference images, ``circuits.search``), without edges and with them, relative to the same
  forward+backward. Target <= 30x. The passes column counts its model runs in images.
  The same with EAP-IG as the ranking; and on the synthetic CNN the edge circuit
  (``edges="attribution"``: edge scores, then a size search over edges, each probe one run
  of the network per unit of the widest tap), timed once.
- patching: ``hm.patch`` of every unit of one layer in batched forwards, relative to one
  ``hm.patch`` call per unit. Target >= 10x.
Prints a table and writes CSV (default benchmarks/results/circuits.csv).
"""
from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import pandas as pd
import torch

import circuitlab as cl  # noqa: E402
from circuitlab.circuits import read_circuit  # noqa: E402
from _common import report, run_benchmark, start  # noqa: E402


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def best_of(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t)
    return min(times)


def fwd_bwd(hm, x):
    xi = x.clone().requires_grad_(True)
    hm.model(xi).max().backward()


def bench(name, hm, x, source, refs, layer, k, reps, edges="auto", edge_circuit=False):
    rows = []
    base = best_of(lambda: fwd_bwd(hm, x), reps)
    runs = [("iterative", "none"), ("iterative", edges), ("eap-ig", "none")]
    for rank_by, e in runs:
        t = best_of(lambda: read_circuit(hm, x, reference=refs, edges=e, rank_by=rank_by),
                    reps)
        c = read_circuit(hm, x, reference=refs, edges="none", rank_by=rank_by)
        what = "default readout (faithful)" if rank_by == "iterative" else \
            f"faithful readout, rank_by={rank_by}"
        rows.append({"model": name, "what": f"{what}, edges={e}",
                     "seconds": t, "baseline": "forward+backward b1", "baseline_seconds": base,
                     "ratio": t / base, "passes": f"{c.meta['search_passes_forward_backward']} "
                     f"fwd+bwd, {c.meta['search_passes_forward']} fwd",
                     "units": f"{c.meta['search_fraction']:.3f}"})
    if edge_circuit:    # minutes on Lite0 (one run of the network per unit of a tap)
        t0 = time.perf_counter()
        c = read_circuit(hm, x, reference=refs, edges="attribution")
        t = time.perf_counter() - t0
        rows.append({"model": name, "what": "edge circuit (edges=attribution)", "seconds": t,
                     "baseline": "forward+backward b1", "baseline_seconds": base,
                     "ratio": t / base, "passes": f"{c.meta['edge_search_probes']} probes",
                     "units": f"{c.meta['edge_search_fraction']:.3f} of edges"})
    for e in (edges, "effective") if edges != "effective" else (edges,):
        t = best_of(lambda: read_circuit(hm, x, select_by="energy", k=k, edges=e), reps)
        rows.append({"model": name, "what": f"readout k={k}, edges={e}", "seconds": t,
                     "baseline": "forward+backward b1", "baseline_seconds": base,
                     "ratio": t / base})
    n = hm.n_units(layer)
    variants = hm.each_unit(layer)
    batched = best_of(lambda: hm.patch(x, source, variants), reps)
    one = best_of(lambda: [hm.patch(x, source, [v]) for v in variants], max(1, reps // 2))
    rows.append({"model": name, "what": f"patch all {n} units of {layer}", "seconds": batched,
                 "baseline": "one patch call per unit", "baseline_seconds": one,
                 "ratio": one / batched})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu or cuda (the synthetic CNN is then "
                   "untrained: timing only, no training on the GPU)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "circuits.csv"))
    args = p.parse_args(argv)
    start(args.out, args.device)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    reps = 1 if args.quick else args.reps
    rows = []
    dev = torch.device(args.device)
    trained = not args.quick and dev.type == "cpu"
    hm = cl.synthetic.synthetic_model("cnn", log=None) if trained else \
        cl.HookedModel(cl.synthetic.build("cnn"), data_config=cl.synthetic.DATA_CONFIG)
    hm.to(dev)
    data = cl.synthetic.make_dataset(2, seed=123).normalized().to(dev)
    refs = cl.synthetic.make_dataset(8, seed=7).normalized().to(dev)
    rows += bench("synthetic cnn", hm, data[:1], data[1:], refs, "layer3", 16, reps,
                  edge_circuit=True)
    if not args.quick:
        hm = cl.load_model("efficientnet_lite0", device=dev)
        x = cl.data.load_image("coffee", hm).to(dev)
        src = cl.data.load_image("chelsea", hm).to(dev)
        refs = torch.cat([cl.data.load_image(s, hm) for s in cl.data.available_samples()
                          if s != "coffee"][:8]).to(dev)
        rows += bench("efficientnet_lite0", hm, x, src, refs, "blocks.4", 16, reps)
    df = pd.DataFrame(rows)
    df.insert(0, "device", torch.cuda.get_device_name() if dev.type == "cuda" else "cpu")
    report(df, args.out)
    return 0


if __name__ == "__main__":
    run_benchmark(main)
