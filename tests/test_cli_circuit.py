"""`circuitlab circuit`, `ablate` and `patch` as a user runs them: tables, graph, validation,
the default size search and edge circuits, from a checkpoint or a benchmark model."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from circuitlab import HookedModel, save_checkpoint, synthetic
from circuitlab.cli import main


def test_cli_circuit_writes_tables_graph_and_validation(tmp_path, capsys):
    torch.manual_seed(0)
    hm = HookedModel(synthetic.build("cnn"), data_config=synthetic.DATA_CONFIG,
                     labels=list(synthetic.CLASSES))
    model = save_checkpoint(hm, tmp_path / "cnn.pt", arch="synthetic_cnn")
    arr = (synthetic.make_dataset(1, seed=5).images[0].permute(1, 2, 0).numpy() * 255)
    Image.fromarray(arr.astype(np.uint8)).save(tmp_path / "s.png")
    exp = tmp_path / "exp"
    assert main(["explain", "--model", str(model), "--image", str(tmp_path / "s.png"),
                 "--out", str(exp), "--steps", "3"]) == 0
    out = tmp_path / "circ"
    argv = ["circuit", "--model", str(model), "--image", str(tmp_path / "s.png"), "--out",
            str(out), "--explanation", str(exp), "--select", "energy", "--k", "4",
            "--reference", "synthetic", "--json"]
    capsys.readouterr()
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["read_on"] == "explanation" and res["units"] == 12
    assert {"faithfulness", "necessity", "random_faithfulness", "image_circuit"} <= set(res)
    for name in ("nodes.csv", "edges.csv", "circuit.graphml", "circuit.json", "circuit.png",
                 "validation.json"):
        assert (out / name).is_file(), name
    assert Image.open(out / "circuit.png").size[0] > 100
    edges = pd.read_csv(out / "edges.csv")
    # a max-pool then one conv between the taps: the conv's weight (channel-wise modules
    # pass units through); only pooling before the features: the identity path
    kinds = edges.groupby(["src_layer", "dst_layer"])["kind"].first().to_dict()
    assert kinds == {("layer2", "layer3"): "weight", ("layer3", "layer4"): "weight",
                     ("layer4", "hook_pooled"): "path", ("hook_pooled", "hook_logits"):
                     "feature_class"}
    assert main(argv) == 2 and "--force" in capsys.readouterr().err
    assert main(argv[:-1] + ["--explain", "--force"]) == 2     # both sources: one-line error
    assert "not both" in capsys.readouterr().err
    # learned selection: a budget of all tapped units, validated with the contrast
    learned = ["circuit", "--model", str(model), "--image", str(tmp_path / "s.png"), "--out",
               str(tmp_path / "learned"), "--select", "learned", "--budget", "0.1",
               "--steps", "12", "--reference", "synthetic", "--edges", "none", "--json"]
    capsys.readouterr()
    assert main(learned) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["units"] == round(0.1 * sum(hm.n_units(n) for n in hm.taps))
    assert pd.read_csv(tmp_path / "learned" / "edges.csv").empty
    assert main(learned[:-3] + ["--budget", "2", "--force"]) == 2     # one-line error
    assert "budget" in capsys.readouterr().err


def test_no_figures_leaves_out_the_drawings_and_a_rerun_with_them_adds_them(tmp_path,
                                                                            capsys):
    """Over a folder, --no-figures writes the tables, graph and validation, not circuit.png
    or circuit.html; whether figures are drawn is not a setting of what the run finds, so a
    rerun with them redoes only the images that lack them, and one without them resumes."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, img in enumerate(synthetic.make_dataset(2, seed=5).images):
        arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(photos / f"s{i}.png")
    out = tmp_path / "out"
    argv = ["circuit", "--model", "synthetic-cnn", "--image", str(photos), "--out", str(out),
            "--select", "energy", "--k", "4", "--edges", "none", "--workers", "0"]
    assert main(argv + ["--no-figures"]) == 0
    assert sorted(p.name for p in (out / "s0_png").iterdir()) == [
        "circuit.graphml", "circuit.json", "edges.csv", "edges.parquet", "nodes.csv",
        "nodes.parquet", "validation.json"]
    capsys.readouterr()
    assert main(argv) == 0 and "2 done, 0 already done" in capsys.readouterr().out
    assert Image.open(out / "s1_png" / "circuit.png").size[0] > 100
    assert (out / "s1_png" / "circuit.html").stat().st_size > 0
    assert main(argv + ["--no-figures"]) == 0
    assert "0 done, 2 already done" in capsys.readouterr().out


def test_cli_ablate_and_patch_write_csv(tmp_path, capsys):
    torch.manual_seed(0)
    hm = HookedModel(synthetic.build("cnn"), data_config=synthetic.DATA_CONFIG)
    model = save_checkpoint(hm, tmp_path / "cnn.pt", arch="synthetic_cnn")
    arr = (synthetic.make_dataset(1, seed=6).images[0].permute(1, 2, 0).numpy() * 255)
    Image.fromarray(arr.astype(np.uint8)).save(tmp_path / "s.png")
    common = ["--model", str(model), "--image", str(tmp_path / "s.png")]
    assert main(["explain", *common, "--out", str(tmp_path / "e"), "--steps", "2"]) == 0
    capsys.readouterr()
    assert main(["ablate", *common, "--layer", "layer3", "--out", str(tmp_path / "a.csv"),
                 "--ablation", "mean", "--reference", "synthetic", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["ablation"] == "mean"
    df = pd.read_csv(tmp_path / "a.csv")
    assert res["units"] == 64 == len(df) and {"logit_change", "top1_kept"} <= set(df.columns)
    argv = ["patch", *common, "--explanation", str(tmp_path / "e"), "--layer", "layer4",
            "--out", str(tmp_path / "p.csv"), "--json"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["agreement"]) == {"pearson", "spearman"}
    assert len(pd.read_csv(tmp_path / "p.csv")) == 64
    assert main(argv) == 2 and "--force" in capsys.readouterr().err
    assert main(["ablate", *common, "--layer", "nope", "--out", str(tmp_path / "x.csv")]) == 2
    assert "nope" in capsys.readouterr().err


def test_cli_circuit_defaults_to_the_smallest_faithful_circuit(tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["circuit", "--model", "synthetic-cnn", "--image", "synthetic:0", "--out",
                 str(out), "--reference", "synthetic", "--edges", "none", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["select"] == "faithful" and res["size_search"]["threshold"] == 0.8
    assert res["faithfulness"]["contrast_fraction"] >= 0.8 and res["faithfulness"]["top1_kept"]
    assert res["size_search"]["units"] == res["units"]
    assert json.loads((out / "validation.json").read_text())["size_search"]["found"]
    assert main(["circuit", "--model", "synthetic-cnn", "--image", "synthetic:0", "--out",
                 str(tmp_path / "d"), "--k", "4"]) == 2
    assert "select_by='energy'" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_circuit_with_attribution_edges(tmp_path, capsys):
    assert main(["circuit", "--model", "synthetic-cnn", "--image", "synthetic:0", "--out",
                 str(tmp_path / "c"), "--reference", "synthetic", "--edges", "attribution",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["edge_search"]["contrast"] >= 0.8 and res["edge_search"]["found"]
    assert res["faithfulness"]["contrast_fraction"] >= res["edge_search"]["contrast"] - 1e-4
