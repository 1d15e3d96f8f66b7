"""Folder runs as a user leaves them unattended: outputs that cannot collide, a bad file
skipped and reported, one results table, resume, settings checked, a lock, whole results."""
import json
import os
import shutil

import pandas as pd
import pytest

from circuitlab.cli import main
from circuitlab.errors import CircuitlabError
from circuitlab.files import locked, staged, write_text
from circuitlab.runs import folder_names


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def folder(tmp_path, tiny_checkpoint):
    """cat.png and cat.jpg (one image twice), a corrupt file, a sub-folder named like an
    image, and the checkpoint."""
    d = tmp_path / "photos"
    d.mkdir()
    shutil.copy(tmp_path / "shape0.png", d / "cat.png")
    from PIL import Image
    Image.open(tmp_path / "shape1.png").save(d / "cat.jpg", quality=95)
    (d / "broken.png").write_bytes(b"\x89PNG not really")
    (d / "sub.png").mkdir()
    return d, tiny_checkpoint


def test_folder_names_keep_the_extension_and_never_collide(tmp_path):
    names = folder_names([tmp_path / "cat.png", tmp_path / "cat.jpg", tmp_path / "Cat.PNG",
                          tmp_path / "cat_png"])
    assert list(names.values()) == ["cat_png", "cat_jpg", "Cat_PNG-2", "cat_png-3"]


def test_a_folder_run_skips_a_bad_file_resumes_and_checks_settings(capsys, tmp_path, folder):
    d, model = folder
    out = tmp_path / "out"
    argv = ["explain", "--model", str(model), "--image", str(d), "--out", str(out),
            "--steps", "2", "--no-minimal", "--batch-size", "2", "--workers", "0"]
    code, stdout, err = run(capsys, *argv)
    assert code == 1, err                                   # one image failed, the others ran
    assert "broken.png: failed: cannot read" in stdout and "2 done" in stdout
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == {
        "cat_png", "cat_jpg", "results.csv", "results.parquet", "run.json"}
    table = pd.read_csv(out / "results.csv")
    assert list(table["image"].map(os.path.basename)) == ["broken.png", "cat.jpg", "cat.png"]
    assert list(table["status"]) == ["failed", "ok", "ok"]
    assert pd.read_parquet(out / "results.parquet")["area_fraction"].notna().sum() == 2
    metrics = json.loads((out / "cat_png" / "metrics.json").read_text())
    assert table.set_index("output").loc["cat_png", "area_fraction"] == metrics["area_fraction"]
    stamp = (out / "cat_png" / "mask.png").stat().st_mtime_ns
    code, stdout, _ = run(capsys, *argv)                    # resume: only the failure again
    assert code == 1 and "0 done, 2 already done earlier, 1 failed" in stdout
    assert (out / "cat_png" / "mask.png").stat().st_mtime_ns == stamp
    code, _, err = run(capsys, *[("3" if a == "2" and argv[i - 1] == "--steps" else a)
                                 for i, a in enumerate(argv)])
    assert code == 2 and "other settings (steps 2 -> 3)" in err
    (d / "broken.png").unlink()
    code, stdout, _ = run(capsys, *argv, "--force")         # redo everything
    assert code == 0 and "2 done, 0 already" in stdout
    assert (out / "cat_png" / "mask.png").stat().st_mtime_ns != stamp


def test_a_second_writer_is_refused_and_a_dead_ones_lock_taken_over(capsys, tmp_path, folder):
    d, model = folder
    out = tmp_path / "out"
    argv = ["explain", "--model", str(model), "--image", str(d / "cat.png"), "--out",
            str(out), "--steps", "2", "--no-minimal"]
    with locked(out):                                       # another run (this process) lives
        code, _, err = run(capsys, *argv)
    assert code == 2 and "being written by another circuitlab run" in err
    assert not out.exists()
    import socket
    (tmp_path / ".out.circuitlab-lock").write_text(f"{socket.gethostname()} 999999999")
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    assert not (tmp_path / ".out.circuitlab-lock").exists()


def test_rows_go_to_a_journal_the_table_is_rewritten_rarely_and_both_resume(tmp_path,
                                                                           monkeypatch):
    """Each row is appended to the journal as it is recorded; the table is rewritten at the
    first record and then at most every TABLE_EVERY seconds, not after each image (a run of n
    images rewrote it n times, n^2 / 2 rows). A run killed before it flushed resumes from the
    table and the journal (its torn last line skipped); the end leaves the table alone."""
    from circuitlab import runs
    monkeypatch.setattr(runs, "TABLE_EVERY", 1e9)
    written = []
    rewrite = runs.FolderRun._write
    monkeypatch.setattr(runs.FolderRun, "_write", lambda self, table, rows: written.append(
        table) or rewrite(self, table, rows))
    images = [tmp_path / f"i{k}.png" for k in range(5)]
    out = tmp_path / "out"

    def folder_run():
        return runs.FolderRun(out, images, "explain", {"steps": 2}, ("mask.png",))
    first = folder_run()
    assert first.start() == images
    for k, image in enumerate(images[:3]):
        write_text(first.folder(image) / "mask.png", "m")
        first.record(image, {"area": k / 10})
    assert written == ["results"] and len(pd.read_csv(out / "results.csv")) == 1
    assert len(first.journal.read_text().splitlines()) == 2         # the rows since then
    with open(first.journal, "a") as f:              # a line that is no row; killed mid-line
        f.write('[1, 2]\n{"image": "i3.p')
    again = folder_run()                                            # no flush: resume
    assert again.start() == images[3:]
    again.record(images[3], error="cannot read")
    again.flush()
    again.merge()
    table = pd.read_csv(out / "results.csv")
    assert list(table["status"]) == ["ok", "ok", "ok", "failed"]
    assert list(table["area"][:3]) == [0.0, 0.1, 0.2]
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        "results.csv", "results.parquet", "run.json"]                # the journal merged away
    (tmp_path / "other" / "results.jsonl").mkdir(parents=True)      # a folder in its way
    with pytest.raises(CircuitlabError, match="results.jsonl is a folder"):
        runs.FolderRun(tmp_path / "other", images, "explain", {}, ("mask.png",), force=True
                       ).check()


def test_a_result_is_replaced_whole_or_not_at_all(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    for name in ("nodes.csv", "validation.json", "reason_3.png", "mine.txt"):
        write_text(out / name, "old")
    with pytest.raises(RuntimeError):
        with staged(out, ("nodes.csv", "validation.json", "reason_3.png")) as tmp:
            write_text(tmp / "nodes.csv", "new")
            raise RuntimeError("the run fails half-way")
    assert (out / "nodes.csv").read_text() == "old"         # no mix of new and old
    with staged(out, ("nodes.csv", "validation.json", "reason_3.png")) as tmp:
        write_text(tmp / "nodes.csv", "new")
        write_text(tmp / "validation.json", "new")
    assert {p.name: p.read_text() for p in out.iterdir()} == {
        "nodes.csv": "new", "validation.json": "new", "mine.txt": "old"}   # stale one gone
    assert [p.name for p in tmp_path.iterdir()] == ["r"]                  # nothing left over


def test_the_lock_refuses_while_held_and_is_released(tmp_path):
    with locked(tmp_path / "x"):
        with pytest.raises(CircuitlabError, match="being written"):
            with locked(tmp_path / "x"):
                pass
    with locked(tmp_path / "x"):
        pass


@pytest.mark.slow
@pytest.mark.parametrize("stop, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_an_interrupted_run_loses_nothing_written_and_resumes(tmp_path, tiny_checkpoint,
                                                              stop, code):
    """Ctrl-C, or a scheduler's SIGTERM: the run ends as an interrupt, its table written, its
    lock released, nothing half-written; the same command resumes."""
    import signal
    import subprocess
    import sys
    import time
    n = 64           # long enough a run that the signal comes while it goes on
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(n):
        shutil.copy(tmp_path / f"shape{i % 2}.png", photos / f"s{i:02d}.png")
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "circuitlab", "explain", "--model", str(tiny_checkpoint),
            "--image", str(photos), "--out", str(out), "--steps", "100", "--no-minimal",
            "--batch-size", "1", "--workers", "0"]
    # a shell that starts jobs in the background makes them ignore SIGINT, which the run would
    # inherit (and Python then leaves ignored): the run gets the default, as a terminal's has
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    journal = out / "results.jsonl"     # rows since the table was last rewritten
    while time.time() < deadline and proc.poll() is None and \
            len(list(out.glob("*_png/mask.png"))) < 2:     # image folders appear whole
        time.sleep(0.05)
    running = proc.poll() is None
    proc.send_signal(getattr(signal, stop))
    stdout, err = proc.communicate(timeout=120)
    assert running, f"the run ended before the signal: {stdout[-500:]} {err[-500:]}"
    assert proc.returncode == code, err[-2000:]
    done = pd.read_csv(out / "results.csv")      # the interrupted run rewrote it
    assert 2 <= len(done) < n and (done["status"] == "ok").all()
    assert not journal.exists()
    stamps = {o: (out / o / "mask.png").stat().st_mtime_ns for o in done["output"]}
    assert not list(tmp_path.rglob("*circuitlab-lock")) and not list(out.glob(".*partial*"))
    again = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{n - len(done)} done, {len(done)} already done earlier, 0 failed" in again.stdout
    table = pd.read_csv(out / "results.csv")
    assert len(table) == n and (table["status"] == "ok").all()
    assert {o: (out / o / "mask.png").stat().st_mtime_ns for o in done["output"]} == stamps


def test_outputs_a_run_did_not_write_are_never_replaced(capsys, tmp_path, folder):
    d, model = folder
    out = tmp_path / "out"
    (out / "cat_png").mkdir(parents=True)
    (out / "cat_png" / "mask.png").write_bytes(b"the user's own")
    argv = ["explain", "--model", str(model), "--image", str(d), "--out", str(out),
            "--steps", "2", "--no-minimal", "--workers", "0"]
    code, _, err = run(capsys, *argv)
    assert code == 2 and "holds no circuitlab run to resume" in err
    assert (out / "cat_png" / "mask.png").read_bytes() == b"the user's own"
    code, _, err = run(capsys, *argv, "--force")
    assert code == 1 and (out / "cat_png" / "mask.png").read_bytes() != b"the user's own"
