"""Every bad input of issue 20, one row each: one clear line that says what to do, exit
status 2 (CircuitlabError from Python), before any long computation, and nothing written."""
import os
import socket

import pytest
import torch
from PIL import Image

from circuitlab import CircuitlabError, HookedModel, synthetic
from circuitlab.cli import main


def _setup(tmp, model):
    """Files the rows refer to, under ``tmp``."""
    Image.new("RGB", (1, 1), (9, 9, 9)).save(tmp / "dot.png")
    (tmp / "a_file").write_text("x")
    (tmp / "a_dir").mkdir()
    import timm
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), tmp / "r18.pt")
    from circuitlab.explain import Explainer, amortized_preset
    from circuitlab.explain.generator import MaskUNet
    cfg = amortized_preset("generic", 32)
    Explainer(MaskUNet(3, cfg.width, cfg.depth, cfg.out_stride, cfg.init_keep), cfg,
              "synthetic_cnn", (3, 32, 32), step=0).save(tmp / "untrained.pt")


IMG = "{tmp}/shape0.png"
MODEL = ["--model", "{model}"]
CASES = [
    # (id, argv, message, environment)
    ("decompression bomb", ["predict", *MODEL, "--image", IMG], "too large to decode safely",
     {"bomb": True}),
    ("seed out of range", ["explain", "--out", "{tmp}/o", "--seed", "99999999999999999999"],
     "--seed must lie in 0 .. 2**63 - 1", {}),
    ("state_dict of another architecture", ["predict", "--model", "resnet50",
                                            "--random-weights", "--checkpoint",
                                            "{tmp}/r18.pt", "--image", IMG],
     "does not fit the architecture", {}),
    ("--out is a file", ["explain", *MODEL, "--image", IMG, "--out", "{tmp}/a_file"],
     "is a file", {}),
    ("--out under a file", ["explain", *MODEL, "--image", IMG, "--out", "{tmp}/a_file/o"],
     "is a file, so", {}),
    ("a folder where a file goes, --force", ["ablate", *MODEL, "--image", IMG, "--layer",
                                             "layer1", "--out", "{tmp}/a_dir", "--force"],
     "is a folder where a file is to be written", {}),
    ("an unwritable folder", ["explain", *MODEL, "--image", IMG, "--out", "{tmp}/ro/o"],
     "is not writable", {"readonly": "ro"}),
    ("checkpoint with a benchmark model", ["predict", "--model", "synthetic-cnn",
                                           "--checkpoint", "{tmp}/missing.pt", "--image",
                                           IMG], "benchmark's own trained model", {}),
    ("an unfinished explainer", ["explain", *MODEL, "--image", IMG, "--out", "{tmp}/o",
                                    "--mode", "amortized", "--explainer",
                                    "{tmp}/untrained.pt"], "is unfinished: trained 0 of", {}),
    ("a hub name offline", ["predict", "--model", "vit_small_patch16_224", "--image", IMG],
     "--random-weights", {"offline": True}),
    ("k beyond every layer", ["circuit", *MODEL, "--image", IMG, "--out", "{tmp}/o",
                              "--select", "energy", "--k", "100000", "--reference",
                              "synthetic"], "more units than any tapped layer", {}),
    ("an unknown target class", ["explain", *MODEL, "--image", IMG, "--out", "{tmp}/o",
                                 "--target", "zebra"], "is no class of", {}),
    ("a target index out of range", ["explain", *MODEL, "--image", IMG, "--out", "{tmp}/o",
                                     "--target", "99"], "has classes 0 ..", {}),
    ("another run holds --out", ["explain", *MODEL, "--image", IMG, "--out", "{tmp}/o"],
     "being written by another circuitlab run", {"locked": "o"}),
    ("an unknown model", ["predict", "--model", "resnet_18"],
     "unknown model 'resnet_18'. Did you mean", {}),
    ("no such image", ["predict", "--image", "/no/such/file.png"], "no image file or sample",
     {}),
    ("no hook point matches", ["layers", "--model", "resnet18", "--random-weights",
                               "--pattern", "zzz*"], "no hook point", {}),
    ("a missing checkpoint", ["predict", "--model", "resnet18", "--checkpoint",
                              "/no/ckpt.pt"], "does not exist", {}),
    ("zero steps", ["explain", "--out", "{tmp}/o", "--steps", "0"],
     "--steps must be at least 1", {}),
    ("steps not a number", ["explain", "--out", "{tmp}/o", "--steps", "many"],
     "--steps 'many' is not a whole number", {}),
    ("a budget above 1", ["circuit", "--out", "{tmp}/o", "--budget", "1.5"],
     "--budget must lie in", {}),
    ("an unknown saliency method", ["saliency", "--out", "{tmp}/o", "--method", "nope"],
     "--method: invalid", {}),
    ("no --out", ["explain", "--image", "coffee"], "required: --out", {}),
    ("an image that is not there", ["explain", "--out", "{tmp}/o", "--image", "nope.png"],
     "no image file", {}),
]


@pytest.mark.parametrize("argv, message, env", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path, tiny_checkpoint,
                                                  monkeypatch, argv, message, env):
    _setup(tmp_path, tiny_checkpoint)
    argv = [a.format(tmp=tmp_path, model=tiny_checkpoint) for a in argv]
    if env.get("bomb"):
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    if env.get("offline"):
        monkeypatch.setenv("CIRCUITLAB_OFFLINE", "1")
    if env.get("readonly"):
        (tmp_path / env["readonly"]).mkdir()
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, m, **k: False if str(p) == str(
            tmp_path / env["readonly"]) else real(p, m, **k))
    if env.get("locked"):   # a live run (this process) holds the lock
        (tmp_path / f".{env['locked']}.circuitlab-lock").write_text(
            f"{socket.gethostname()} {os.getpid()}")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.startswith("circuitlab: error: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before   # nothing written


def test_a_tiny_image_is_explained_with_a_warning(capsys, tmp_path, tiny_checkpoint):
    Image.new("RGB", (1, 1), (200, 10, 10)).save(tmp_path / "dot.png")
    code = main(["predict", "--model", str(tiny_checkpoint), "--image",
                 str(tmp_path / "dot.png")])
    out, err = capsys.readouterr()
    assert code == 0 and "circuitlab: warning: the image is 1x1 pixels" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("x, message", [
    ([torch.zeros(3, 32, 32)], "expected an image batch as a torch tensor, got list"),
    (torch.zeros(0, 3, 32, 32), "the batch is empty"),
    (torch.zeros(3, 32, 32), "add the batch axis with x[None]"),
    (torch.full((1, 3, 32, 32), float("nan")), "NaN"),
])
def test_explain_refuses_what_is_not_a_batch(x, message):
    from circuitlab.explain import explain
    hm = HookedModel(synthetic.build("cnn"), data_config=synthetic.DATA_CONFIG)
    with pytest.raises(CircuitlabError, match=message.replace("[", r"\[").replace("]", r"\]")):
        explain(hm, x, steps=2)
