"""torchrun with 2 gloo processes on CPU: the images are sharded, each rank writes its own
table, rank 0 merges them into the table one process writes."""
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest

# what differs between runs by design: timing, and the thread count of each process
_HOW = ["seconds", "threads"]


def _torchrun(n, argv, env):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                           str(n), "--master_port", str(29500 + os.getpid() % 1000),
                           "-m", "circuitlab", *argv], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.mark.slow
def test_two_processes_write_the_table_one_process_writes(tmp_path, tiny_checkpoint):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(5):
        shutil.copy(tmp_path / f"shape{i % 2}.png", photos / f"s{i}.png")
    (photos / "broken.png").write_bytes(b"no")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    common = ["explain", "--model", str(tiny_checkpoint), "--image", str(photos), "--steps",
              "3", "--no-minimal", "--workers", "0", "--batch-size", "2"]
    two = _torchrun(2, [*common, "--out", str(tmp_path / "two")], env)
    assert two.returncode != 0                       # the broken file failed, on its rank
    assert "broken.png: failed" in two.stdout and "5 done" in two.stdout, two.stderr[-2000:]
    one = subprocess.run([sys.executable, "-m", "circuitlab", *common, "--out",
                          str(tmp_path / "one")], capture_output=True, text=True, env=env,
                         timeout=600)
    assert one.returncode == 1, one.stderr[-2000:]
    a = pd.read_csv(tmp_path / "one" / "results.csv").drop(columns=_HOW)
    b = pd.read_csv(tmp_path / "two" / "results.csv").drop(columns=_HOW)
    pd.testing.assert_frame_equal(a, b)
    assert sorted(p.name for p in (tmp_path / "two").glob("results*")) == [
        "results.csv", "results.parquet"]            # the ranks' tables merged away
    for i in range(5):
        assert (tmp_path / "one" / f"s{i}_png" / "mask.png").read_bytes() == \
            (tmp_path / "two" / f"s{i}_png" / "mask.png").read_bytes()


@pytest.mark.slow
def test_ddp_training_follows_the_one_process_loss_curve(tmp_path):
    import torch

    from circuitlab.explain import Explainer
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    common = ["train-explainer", "--model", "synthetic-cnn", "--data", "synthetic", "--images",
              "16", "--steps", "6", "--teacher-steps", "3", "--batch-size", "8"]
    two = _torchrun(2, [*common, "--out", str(tmp_path / "two.pt")], env)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "circuitlab", *common, "--out",
                          str(tmp_path / "one.pt")], capture_output=True, text=True, env=env,
                         timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    a, b = Explainer.load(tmp_path / "one.pt"), Explainer.load(tmp_path / "two.pt")
    la = torch.tensor([r["loss"] for r in a.history])
    lb = torch.tensor([r["loss"] for r in b.history])
    assert len(la) == len(lb) == 6
    torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(a.net.state_dict().items(), b.net.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
