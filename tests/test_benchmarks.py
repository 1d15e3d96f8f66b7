"""The benchmark scripts still run (tiny shapes; no timing is asserted)."""
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def test_hooks_benchmark_smoke(tmp_path):
    out = tmp_path / "hooks.csv"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hooks.py"), "--quick",
                        "--reps", "1", "--batches", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    df = pd.read_csv(out)
    assert set(df["method"]) >= {"bare forward", "torch hooks (taps)", "run_with_cache (taps)"}
    assert (df["min_ms"] > 0).all() and len(df) == 10


def test_explain_benchmark_smoke(tmp_path):
    out = tmp_path / "explain.csv"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "explain.py"), "--quick",
                        "--out", str(out)], capture_output=True, text=True, timeout=900,
                       env={**os.environ, "CIRCUITLAB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    df = pd.read_csv(out)
    assert set(df["table"]) == {"photos", "synthetic", "amortized_speed"}
    modes = set(df.loc[df["table"] == "synthetic", "mode"])
    assert modes == {"per-image", "amortized", "amortized+10"}
