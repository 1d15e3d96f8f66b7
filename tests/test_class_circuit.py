"""Class-level circuits on the benchmark's trained CNN, against per-image readouts."""
import pytest

import circuitlab as cl
from circuitlab import CircuitlabError, synthetic
from circuitlab.circuits import class_circuit, read_circuit


@pytest.fixture(scope="module")
def disks():
    hm = cl.load_model("synthetic-cnn")
    data = synthetic.make_dataset(200, seed=11)
    x, y = data.normalized(), data.labels
    c = int(y[0])
    return hm, c, x[y == c][:8], x[y != c][:16]


def test_shares_are_counts_of_the_images_circuits(disks):
    hm, c, imgs, refs = disks
    cc = class_circuit(hm, imgs, c, reference=refs, held_out=0.25, min_share=0.5)
    # oracle: the same readouts, one by one, counted here
    counts = {}
    for i in range(6):
        for layer, units in read_circuit(hm, imgs[i:i + 1], target=c,
                                         reference=refs).units.items():
            for u in units:
                counts[(layer, u)] = counts.get((layer, u), 0) + 1
    got = {(r.layer, int(r.unit)): r.share for r in cc.units.itertuples()}
    assert got == {k: v / 6 for k, v in counts.items()}
    inside = {(layer, u) for layer, us in cc.circuit.units.items() for u in us}
    assert inside == {k for k, v in counts.items() if v / 6 >= 0.5}
    assert len(cc.per_image) == 6 and len(cc.validation) == 2
    assert cc.circuit.meta["target"] == c and cc.circuit.meta["read_on"] == "class"


def test_the_class_circuit_carries_held_out_images_better_than_random(disks):
    hm, c, imgs, refs = disks
    s = class_circuit(hm, imgs, c, reference=refs).summary()
    assert s["held_out_contrast"] > s["held_out_random_contrast"] + 0.2
    assert s["held_out_top1_kept"] == 1.0 and s["held_out_removed_top1_kept"] == 0.0


def test_too_few_images_or_no_shared_unit_is_one_clear_error(disks):
    hm, c, imgs, refs = disks
    with pytest.raises(CircuitlabError, match="images held out"):
        class_circuit(hm, imgs[:1], c, reference=refs)
    with pytest.raises(CircuitlabError, match="min_share"):
        class_circuit(hm, imgs[:3], c, reference=refs, min_share=0.0)


def test_the_cli_reads_a_class_circuit_from_a_folder(capsys, tmp_path, disks):
    import json

    import numpy as np
    import pandas as pd
    from PIL import Image

    from circuitlab.cli import main
    hm, c, imgs, _ = disks
    raw = synthetic.make_dataset(200, seed=11)
    pick = raw.images[raw.labels == c][:8]
    for i, img in enumerate(pick):
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(
            tmp_path / f"d{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    code = main(["circuit", "--model", "synthetic-cnn", "--image", str(tmp_path), "--target",
                 synthetic.CLASSES[c], "--reference", "synthetic", "--out", str(out),
                 "--workers", "0", "--json"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert "circuitlab: warning: skipped: cannot read" in err
    res = json.loads(stdout)
    assert res["fit_images"] == 6 and res["held_out_images"] == 2 and res["target"] == c
    held = pd.read_csv(out / "validation.csv")
    assert [p.split("/")[-1] for p in held["image"]] == ["d6.png", "d7.png"]
    nodes = pd.read_csv(out / "nodes.csv")
    units = pd.read_csv(out / "units.csv")
    assert len(nodes) == res["units"] == int(units["in_circuit"].sum())
    assert (out / "circuit.png").is_file()
    code = main(["circuit", "--model", "synthetic-cnn", "--image", str(tmp_path), "--target",
                 synthetic.CLASSES[c], "--reference", "synthetic", "--out", str(out),
                 "--workers", "0", "--no-figures", "--force"])
    assert code == 0 and (out / "nodes.csv").is_file()
    assert not (out / "circuit.png").exists() and not (out / "circuit.html").exists()
