"""Amortized explanations: checkpoints, resume, refinement, the CLI, and quality vs per image."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from circuitlab import CircuitlabError, HookedModel, synthetic
from circuitlab.cli import main
from circuitlab.explain import Explainer, train_explainer


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    hm = HookedModel(synthetic.build("cnn"), name="tiny_cnn", data_config=synthetic.DATA_CONFIG,
                     labels=list(synthetic.CLASSES))
    return hm, synthetic.make_dataset(12, seed=2).normalized()


def _train(hm, x, path, steps, **kw):
    return train_explainer(hm, x, steps=steps, batch_size=4, teacher_steps=2, checkpoint=path,
                           save_every=2, **kw)


def test_checkpoint_round_trip_and_resume_equals_uninterrupted(tiny, tmp_path):
    hm, x = tiny
    full = _train(hm, x, tmp_path / "full.pt", 6)
    assert full.step == 6 and len(full.history) == 6
    _train(hm, x, tmp_path / "part.pt", 3)
    resumed = _train(hm, x, tmp_path / "part.pt", 6, resume=True)
    for (k, a), b in zip(full.net.state_dict().items(), resumed.net.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
    loaded = Explainer.load(tmp_path / "full.pt")            # weights_only=True inside
    ex = loaded.explain(hm, x[:3])
    assert ex.mask.shape == (3, 1, 32, 32) and set(ex.mask.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(ex.mask, full.explain(hm, x[:3]).mask)
    torch.testing.assert_close(ex.explanation, ex.mask * x[:3])


def test_existing_checkpoint_needs_resume_or_force(tiny, tmp_path):
    hm, x = tiny
    path = tmp_path / "e.pt"
    _train(hm, x, path, 1)
    before = path.read_bytes()
    with pytest.raises(CircuitlabError, match="--resume"):
        _train(hm, x, path, 2)
    assert path.read_bytes() == before
    with pytest.raises(CircuitlabError, match="different image set"):
        _train(hm, x[:5], path, 2, resume=True)
    _train(hm, x, path, 1, overwrite=True)


def test_explainer_refuses_other_models_and_files(tiny, tmp_path):
    hm, x = tiny
    ex = _train(hm, x, None, 1)
    other = HookedModel(synthetic.build("cnn"), name="another",
                        data_config=synthetic.DATA_CONFIG)
    with pytest.raises(CircuitlabError, match="trained for 'tiny_cnn'"):
        ex.explain(other, x[:1])
    bogus = tmp_path / "bogus.pt"
    torch.save({"a": torch.zeros(1)}, bogus)
    with pytest.raises(CircuitlabError, match="not a circuitlab explainer"):
        Explainer.load(bogus)
    with pytest.raises(CircuitlabError, match="does not exist"):
        Explainer.load(tmp_path / "missing.pt")


def test_refinement_starts_from_the_amortized_mask(tiny):
    hm, x = tiny
    ex = _train(hm, x, None, 2)
    refined = ex.explain(hm, x[:2], refine=3)
    assert refined.steps == 3 and len(refined.history) == 3
    # step 1 of the refinement evaluates the amortized mask itself
    first = ex.explain(hm, x[:2])
    assert refined.history["area"][0] == pytest.approx(first.area.mean().item())


def test_cli_train_explainer_then_explain_amortized(capsys, tmp_path, tiny):
    hm, x = tiny
    from circuitlab import save_checkpoint
    model = save_checkpoint(hm, tmp_path / "cnn.pt", arch="synthetic_cnn")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    data = synthetic.make_dataset(3, seed=4)
    for i in range(3):
        arr = (data.images[i].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        Image.fromarray(arr).save(imgs / f"s{i}.png")
    out = tmp_path / "explainer.pt"
    argv = ["train-explainer", "--model", str(model), "--data", str(imgs), "--out", str(out),
            "--steps", "2", "--teacher-steps", "2", "--batch-size", "2", "--json"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["images"] == 3 and res["steps"] == 2 and out.is_file()
    assert main(argv) == 2 and "--resume" in capsys.readouterr().err
    i = argv.index("--steps")
    assert main(argv[:i + 1] + ["3"] + argv[i + 2:] + ["--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 3
    run = tmp_path / "run"
    assert main(["explain", "--model", str(model), "--image", str(imgs / "s0.png"), "--out",
                 str(run), "--mode", "amortized", "--explainer", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["mode"] == "amortized" and res["steps"] == 0
    assert np.asarray(Image.open(run / "mask.png")).shape == (32, 32)
    assert main(["explain", "--model", str(model), "--image", "coffee", "--out",
                 str(tmp_path / "r2"), "--mode", "amortized"]) == 2
    assert "--explainer" in capsys.readouterr().err


def test_large_inputs_train_on_the_explainers_own_grid():
    """Above 128 px the U-Net sees the image at half size; teacher masks must match its
    output grid (56 cells for 224 px, 32 for 128 px)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=4, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 4, 3, stride=2, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 3))
    hm = HookedModel(model, data_config={"input_size": (3, 128, 128)})
    x = torch.randn(3, 3, 128, 128)
    ex = train_explainer(hm, x, steps=2, batch_size=2, teacher_steps=1)
    assert ex.logits(x).shape[-2:] == (32, 32)
    out = ex.explain(hm, x[:1])
    assert out.mask.shape == (1, 1, 128, 128)
