"""The benchmark scripts still run (tiny shapes; no timing is asserted)."""
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args, timeout=900):
    """Run a repo script with this interpreter, offline; the CompletedProcess."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "CIRCUITLAB_OFFLINE": "1"})


def test_hooks_benchmark_smoke(tmp_path):
    out = tmp_path / "hooks.csv"
    r = _run("benchmarks/hooks.py", "--quick", "--reps", "1", "--batches", "1", "--out", out,
             timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    df = pd.read_csv(out)
    assert set(df["method"]) >= {"bare forward", "torch hooks (taps)", "run_with_cache (taps)"}
    assert (df["min_ms"] > 0).all() and len(df) == 10


def test_explain_benchmark_smoke(tmp_path):
    out = tmp_path / "explain.csv"
    r = _run("benchmarks/explain.py", "--quick", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    df = pd.read_csv(out)
    assert set(df["table"]) == {"regions", "photos", "synthetic", "amortized_speed",
                                "reasons", "batch"}
    rg = df[df["table"] == "regions"]
    assert (rg["images_scored"] > 0).all() and rg["area"].between(0, 1).all()
    assert rg["all_four_targets"].isin([True, False]).all()
    assert (rg["eager_seconds"] > 0).all() and rg["same_mask"].all()
    batch = df[df["table"] == "batch"]
    assert batch["iou"].between(0, 1).all() and (batch["speedup"] > 0).all()
    modes = set(df.loc[df["table"] == "synthetic", "mode"])
    assert modes == {"per-image", "amortized", "amortized+10"}
    reasons = df[df["table"] == "reasons"]
    assert reasons["both_found"].between(0, 1).all() and (reasons["reasons"] >= 0).all()
    assert reasons["images_two_reasons"].between(0, reasons["images"]).all()


def test_kernels_benchmark_smoke(tmp_path):
    # on a CPU the kernels run under Triton's interpreter: tiny shapes, no compile column
    out = tmp_path / "kernels.csv"
    r = _run("benchmarks/kernels.py", "--quick", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    df = pd.read_csv(out)
    assert set(df["op"]) == {"activation_matching", "edge_scores", "explain_step"}
    am = df[df["op"] == "activation_matching"]
    assert set(am["method"]) == {"eager", "triton", "triton-one"}
    assert (am["rel_diff_vs_eager"] < 1e-5).all()        # the kernels agree with the reference
    assert (df.loc[df["op"] == "edge_scores", "max_abs_diff"] < 1e-4).all()


def test_circuits_analysis_smoke(tmp_path):
    out = tmp_path / "circ"
    r = _run("analyses/circuits.py", "--quick", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    # run as a script, in its own process (test_analyses checks what the frontier says)
    df = pd.read_csv(out / "frontier.csv")
    assert set(df["ablation"]) == {"mean", "resample"} and "iterative" in set(df["ranking"])
    assert (out / "frontier.png").stat().st_size > 0 and (out / "circuits.md").exists()
    again = _run("analyses/circuits.py", "--quick", "--out", out, timeout=300)
    assert again.returncode == 2 and "--force" in again.stderr      # nothing replaced silently


def test_throughput_benchmark_smoke(tmp_path):
    out = tmp_path / "throughput.csv"
    r = _run("benchmarks/throughput.py", "--quick", "--images", "2", "--commands",
             "explain --no-minimal,saliency gradcam", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    df = pd.read_csv(out)
    assert set(df["command"]) == {"explain --no-minimal", "saliency gradcam"}
    assert (df["images_per_s"] > 0).all() and (df["same_masks"] == 1.0).all()
    assert df.loc[df["batch"] == 1, "vs_one_at_a_time"].eq(1.0).all()


@pytest.mark.parametrize("script", ["hooks", "explain", "kernels", "circuits", "throughput"])
def test_a_benchmark_refuses_an_output_it_cannot_write_at_once(tmp_path, script):
    """Before minutes of timing, not at the end: one line, exit status 2."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    r = _run(f"benchmarks/{script}.py", "--quick", "--out", blocker / "out.csv", timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "--out" in lines[0], r.stderr[-2000:]


def test_a_benchmark_refuses_a_device_it_does_not_have(tmp_path):
    bad = ["nope"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in bad:
        r = _run("benchmarks/hooks.py", "--quick", "--device", device, "--out",
                 tmp_path / "h.csv", timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and "--device" in lines[0], r.stderr
    assert not (tmp_path / "h.csv").exists()


def test_the_explain_benchmark_refuses_bad_search_settings_at_once(tmp_path):
    """Region-search settings are checked before any part runs: one line, exit status 2."""
    for bad in (["--finer-segments", "256,x"], ["--finer-segments", "256,4000"],
                ["--robust-draws", "-1"]):
        r = _run("benchmarks/explain.py", "--quick", *bad, "--out", tmp_path / "e.csv",
                 timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert not (tmp_path / "e.csv").exists()


def test_runs_benchmark_smoke(tmp_path):
    out = tmp_path / "runs.csv"
    r = _run("benchmarks/runs.py", "--quick", "--out", out, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    df = pd.read_csv(out)
    assert list(df["rows"]) == [100, 1000] and (df["records"] == 200).all()
    assert (df["record_ms"] > 0).all() and (df["table_rewrite_ms"] > 0).all()
