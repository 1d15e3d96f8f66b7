"""A folder run's bookkeeping as the run grows (``circuitlab.runs.FolderRun``): milliseconds to
record one image's row after n rows are already recorded, and one rewrite of the results
table at that size.

    python benchmarks/runs.py              # 1,000 / 10,000 / 100,000 rows (under a minute)
    python benchmarks/runs.py --quick      # 100 / 1,000 rows

Each row has the circuit command's 52 scalar columns (numbers, a label, booleans). A record
appends the row to the run's journal; the table (CSV and parquet) is rewritten from every row
at most every ``runs.TABLE_EVERY`` seconds and ``runs.TABLE_COST`` times its last rewrite's
duration, so over a run the rewrites cost at most 1 / TABLE_COST of its time. Target: the
record does not grow with the run (it rewrote the whole table before: 48.6 ms an image at
1,000 rows, 363 ms at 10,000; docs/results.md, "Dataset runs"). ``implied_share_at_30_per_s``:
what one image's record adds at 30 images a second (issue 19's GPU target), rewrites aside.
Prints the table and writes CSV (default benchmarks/results/runs.csv).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd

from _common import report, run_benchmark, start
from circuitlab import runs


def circuit_row(i: int) -> dict:
    """A result with the shape of the circuit command's: 52 scalar columns."""
    row = {"model": "synthetic-cnn", "label": "triangle", "read_on": "image",
           "ablation": "mean", "select": "faithful", "seconds": 1.0 + i * 1e-6}
    row.update({f"metric_{k}": i * 0.001 + k for k in range(40)})
    row.update({f"flag_{k}": bool((i + k) % 2) for k in range(6)})
    return row


def measure(n: int, records: int, where: Path) -> dict:
    images = [Path(f"/photos/img{i:06d}.png") for i in range(n + records)]
    run = runs.FolderRun(where / f"run{n}", images, "circuit", {}, ("validation.json",))
    run.start()
    for i, image in enumerate(images[:n]):     # the rows an earlier part of the run recorded
        run.rows[str(image)] = {"image": str(image), "output": run.names[image],
                                "status": "ok", "error": "", **circuit_row(i)}
    t = time.perf_counter()
    run.flush()                                # one rewrite at this size; the next is due later
    rewrite = time.perf_counter() - t
    t = time.perf_counter()
    for i, image in enumerate(images[n:]):
        run.record(image, circuit_row(n + i))
    per_image = (time.perf_counter() - t) / records
    return {"rows": n, "records": records, "record_ms": 1e3 * per_image,
            "table_rewrite_ms": 1e3 * rewrite,
            "implied_share_at_30_per_s": per_image * 30}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "runs.csv"))
    args = p.parse_args(argv)
    start(args.out)
    sizes = [100, 1_000] if args.quick else [1_000, 10_000, 100_000]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(n, 200, Path(tmp)) for n in sizes]
    report(pd.DataFrame(rows), args.out, float_format="{:.4f}")
    return 0


if __name__ == "__main__":
    run_benchmark(main)
