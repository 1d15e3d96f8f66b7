"""The CLI as a user runs it: real predictions, JSON, and one-line errors without tracebacks."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from circuitlab.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_real_model_json(capsys):
    code, out, err = run(capsys, "predict", "--model", "efficientnet_lite0", "--image", "coffee",
                         "--topk", "3", "--json")
    assert code == 0, err
    res = json.loads(out)["results"][0]["predictions"]
    assert res[0]["label"] == "espresso" and res[0]["probability"] > 0.9 and len(res) == 3


def test_predict_folder_text(capsys, tmp_path):
    for i in range(2):
        Image.fromarray(np.full((40, 50, 3), 60 * i, np.uint8)).save(tmp_path / f"im{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    code, out, err = run(capsys, "predict", "--image", str(tmp_path), "--topk", "2")
    assert code == 0, err
    assert out.count("(efficientnet_lite0)") == 2 and "im1.png" in out


def test_layers_and_models(capsys):
    code, out, err = run(capsys, "layers", "--model", "resnet18", "--random-weights",
                         "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["taps"] == ["act1", "layer1", "layer2", "layer3", "layer4"]
    names = {h["name"]: h for h in data["hooks"]}
    assert names["layer3"]["shape"] == "1x256x14x14" and names["layer3"]["units"] == 256
    code, out, _ = run(capsys, "layers", "--model", "resnet18", "--no-pretrained",  # old name
                       "--kind", "block")
    assert code == 0 and "layer4.1" in out and "conv1" not in out.split("\n", 3)[-1]
    code, out, _ = run(capsys, "models", "--json")
    assert code == 0 and "efficientnet_lite0" in {r["name"] for r in json.loads(out)}


@pytest.mark.slow
def test_installed_entry_point_help_and_errors(tmp_path):
    exe = shutil.which("circuitlab", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("circuitlab is not installed as a console script in this environment")
    for sub in ([], ["models"], ["layers"], ["predict"]):
        r = subprocess.run([exe, *sub, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage: circuitlab" in r.stdout
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    r = subprocess.run([exe, "predict", "--image", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("circuitlab: error: cannot read")


def test_explain_writes_outputs_and_never_overwrites(capsys, tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    argv = ["explain", "--model", str(tiny_checkpoint), "--image", str(tmp_path / "shape0.png"),
            "--out", str(out), "--steps", "3", "--json"]
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    res = json.loads(stdout)
    keys = {"area_fraction", "top1_kept", "label", "confidence_image", "confidence_explanation",
            "sufficiency", "necessity_drop", "deletion_auc", "insertion_auc", "seconds"}
    assert keys <= set(res) and res["steps"] == 3
    assert json.loads((out / "metrics.json").read_text())["label"] == res["label"]
    mask = np.asarray(Image.open(out / "mask.png"))
    assert mask.shape == (32, 32) and set(np.unique(mask)) <= {0, 255}
    assert mask.mean() / 255 == pytest.approx(res["area_fraction"])
    for name in ("explanation.png", "overlay.png"):
        assert Image.open(out / name).size == (32, 32)
    before = (out / "mask.png").read_bytes()
    code, _, err = run(capsys, *argv)
    assert code == 2 and "pass --force" in err and (out / "mask.png").read_bytes() == before
    code, _, err = run(capsys, *argv, "--force")
    assert code == 0, err


def test_explain_at_a_fixed_area(capsys, tmp_path, tiny_checkpoint):
    base = ["explain", "--model", str(tiny_checkpoint), "--image", str(tmp_path / "shape0.png"),
            "--steps", "4", "--json"]
    code, stdout, err = run(capsys, *base, "--area", "0.1", "--out", str(tmp_path / "a"))
    assert code == 0, err
    res = json.loads(stdout)
    assert res["area_budget"] == 0.1 and res["area_fraction"] == round(0.1 * 1024) / 1024
    mask = np.asarray(Image.open(tmp_path / "a" / "mask.png"))
    assert (mask > 0).sum() == round(0.1 * 1024)
    code, _, err = run(capsys, *base, "--area", "1.5", "--out", str(tmp_path / "b"))
    assert code == 2 and "--area must lie in (0, 1)" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()


def test_saliency_command(capsys, tmp_path, tiny_checkpoint):
    out = tmp_path / "gc"
    argv = ["saliency", "--model", str(tiny_checkpoint), "--image", str(tmp_path / "shape0.png"),
            "--method", "gradcam", "--area", "0.1", "--out", str(out), "--json"]
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    res = json.loads(stdout)
    assert res["method"] == "gradcam" and res["area_fraction"] == pytest.approx(0.1, abs=0.002)
    mask = np.asarray(Image.open(out / "mask.png"))
    assert mask.shape == (32, 32) and abs(mask.mean() / 255 - 0.1) < 0.002
    sal = np.asarray(Image.open(out / "saliency.png"))
    # the mask is the top 10 % of the map it was cut from
    assert sal[mask > 0].min() >= sal[mask == 0].max() - 1
    code, _, err = run(capsys, *argv)
    assert code == 2 and "pass --force" in err
    base = argv[:5]                                  # saliency --model M --image I
    code, _, err = run(capsys, *base, "--method", "rollout", "--out", str(tmp_path / "r"))
    assert code == 2 and "does not apply" in err and err.count("\n") == 1
    code, _, err = run(capsys, *base, "--method", "ig", "--area", "2", "--out",
                       str(tmp_path / "a"))
    assert code == 2 and "--area must lie" in err


def test_explain_certifies_and_reports_how_the_mask_reads(capsys, tmp_path, tiny_checkpoint):
    argv = ["explain", "--model", str(tiny_checkpoint), "--image", str(tmp_path / "shape0.png"),
            "--steps", "6", "--json"]
    code, stdout, err = run(capsys, *argv, "--out", str(tmp_path / "m"))
    assert code == 0, err
    res = json.loads(stdout)
    for key in ("regions", "top_regions_share", "confidence_ratio", "top1_kept_under_fill",
                "activation_similarity", "free_area", "minimal_area", "locally_minimal",
                "region_effects", "pruned_regions", "area_search"):
        assert key in res, key
    assert set(res["top1_kept_under_fill"]) == {"grey", "blur", "gaussian", "uniform"}
    assert res["minimal_area"] == res["area_fraction"] <= res["free_area"]
    # the budgets tried halve while they are accepted; the first refusal ends the search
    accepted = [probe["accepted"] for probe in res["area_search"]]
    assert accepted == sorted(accepted, reverse=True) and accepted.count(False) <= 1
    for probe in res["area_search"]:
        assert probe["accepted"] == (probe["kept"] and probe["confidence_ratio"] >= 1)
    if res["top1_kept"]:       # one row per region of the final mask
        assert len(res["region_effects"]) == res["regions"]
    code, stdout, err = run(capsys, *argv, "--no-minimal", "--out", str(tmp_path / "n"))
    assert code == 0, err
    res = json.loads(stdout)
    assert "locally_minimal" not in res and res["area_fraction"] == res["free_area"]
    for bad, message in (("-1", "--confidence must be 0 or more"), ("nan", "not a number")):
        code, _, err = run(capsys, *argv, "--confidence", bad, "--out", str(tmp_path / "c"))
        assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "c").exists()


def test_explain_reasons_writes_one_overlay_per_reason(capsys, tmp_path, tiny_checkpoint):
    out = tmp_path / "r"
    argv = ["explain", "--model", str(tiny_checkpoint), "--image", str(tmp_path / "shape0.png"),
            "--steps", "6", "--reasons", "3", "--out", str(out), "--json"]
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    reasons = json.loads(stdout)["reasons"]
    assert (out / "reasons.png").is_file()
    assert sorted(p.name for p in out.glob("reason_*.png")) == \
        [f"reason_{i}.png" for i in range(1, len(reasons) + 1)]
    assert [r["confidence"] for r in reasons] == sorted((r["confidence"] for r in reasons),
                                                        reverse=True)
    code, _, err = run(capsys, *argv[:-3], "--area", "0.1", "--out", str(tmp_path / "x"))
    assert code == 2 and "--reasons belongs to per-image mode" in err
    # regions mode takes --reasons when named; its other per-image flags it refuses
    regions = ["explain", "--model", str(tiny_checkpoint), "--image",
               str(tmp_path / "shape0.png"), "--mode", "regions", "--segments", "24",
               "--reasons", "2", "--json"]
    code, stdout, err = run(capsys, *regions, "--out", str(tmp_path / "g"))
    assert code == 0, err
    res = json.loads(stdout)
    assert res["mode"] == "regions" and isinstance(res["reasons"], list)
    assert (tmp_path / "g" / "reasons.png").is_file()
    code, _, err = run(capsys, *regions, "--steps", "6", "--out", str(tmp_path / "s"))
    assert code == 2 and "not with --steps" in err and "--reasons" not in err
