"""The region search (explain_regions): masks made of whole superpixels that hold the decision
over every fill, each superpixel needed; checked by direct forwards, not by the search's own
numbers."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

import circuitlab
from circuitlab import CircuitlabError
from circuitlab.backgrounds import make_backgrounds
from circuitlab.explain.regions import RegionSearch, explain_regions, superpixels

# a confidence floor, so that it is checked too (the default is the label alone); the finer
# pass is checked apart (test_the_finer_pass_...)
SEARCH = RegionSearch(segments=24, max_area=0.6, confidence=1.0, refine=None)


@pytest.fixture(scope="module")
def setup():
    hm = circuitlab.load_model("synthetic-cnn")
    data = circuitlab.synthetic.make_dataset(6, seed=123)
    x = data.normalized()
    return hm, x, torch.as_tensor(data.masks).bool(), explain_regions(hm, x, SEARCH, seed=3)


def _holds(hm, x, m, target, fills, floor):
    with torch.no_grad():
        out = [hm(m * x + (1 - m) * f[None]) for f in fills]
    return all(int(o.argmax(-1)) == target for o in out) and \
        float(out[0].softmax(-1)[0, target]) >= floor


def test_masks_are_whole_superpixels_that_hold_over_every_fill(setup):
    hm, x, _, ex = setup
    with torch.no_grad():
        p_image = hm(x).softmax(-1).gather(1, ex.target[:, None]).squeeze(1)
    assert ex.found.any()
    # the search ran in channels-last layout and put the model's back
    assert all(p.is_contiguous() for p in hm.model.parameters())
    for i in range(x.shape[0]):
        xi, m, t = x[i:i + 1], ex.mask[i:i + 1], int(ex.target[i])
        labels = superpixels(hm, xi, SEARCH)
        for s in np.unique(labels):                       # each superpixel all in or all out
            inside = m[0, 0][torch.from_numpy(labels == s)]
            assert bool((inside == inside[0]).all())
        assert ex.certificates[i].locally_minimal == bool(ex.found[i])
        fills = make_backgrounds(xi, hm.data_config, SEARCH.fills,
                                 torch.Generator().manual_seed(3))
        if not bool(ex.found[i]):                        # the best worst case seen
            with torch.no_grad():
                worst = min(float(hm(m * xi + (1 - m) * f[None]).softmax(-1)[0, t])
                            for f in fills)
            assert worst == pytest.approx(max(r["worst_p"] for r in ex.search[i]), rel=1e-4)
            continue
        floor = SEARCH.confidence * float(p_image[i])
        assert _holds(hm, xi, m, t, fills, floor)
        # every superpixel is needed: without any one the decision no longer holds
        for s in np.unique(labels[m[0, 0].numpy() > 0]):
            without = m * torch.from_numpy(labels != s).float()
            assert not _holds(hm, xi, without, t, fills, floor)


def test_the_regions_sit_on_the_planted_object(setup):
    _, _, objects, ex = setup
    found = ex.found.numpy()
    on = [(ex.mask[i, 0].bool() & objects[i, 0]).sum() / ex.mask[i, 0].sum()
          for i in range(len(found)) if found[i]]
    assert float(np.mean(on)) > 0.3          # the object is about 5 % of the image
    assert all(c.regions["pixels"].sum() == int(ex.mask[i].sum())
               for i, c in enumerate(ex.certificates))


def test_bad_settings_are_one_clear_error():
    for bad in (dict(segments=1), dict(max_area=0.0), dict(fills=())):
        with pytest.raises(CircuitlabError):
            RegionSearch(**bad)


def test_cli_regions_mode(tmp_path, capsys):
    from circuitlab.cli import main
    out = tmp_path / "r"
    code = main(["explain", "--model", "synthetic-cnn", "--image", "synthetic:2", "--out",
                 str(out), "--mode", "regions", "--segments", "24", "--json"])
    _, err = capsys.readouterr()
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == "regions" and metrics["segments"] == 24
    assert metrics["region_search"] and "found" in metrics and "region_effects" in metrics
    capsys.readouterr()
    for bad in (["--area", "0.1"], ["--refine", "3"], ["--precision", "bf16"],
                ["--steps", "5"], ["--no-minimal"], ["--reasons", "2"]):
        code = main(["explain", "--model", "synthetic-cnn", "--image", "synthetic:2", "--out",
                     str(tmp_path / "bad"), "--mode", "regions", *bad])
        assert code == 2 and bad[0] in capsys.readouterr().err, bad
    for bad in (["--segments", "30", "--mode", "per-image"], ["--segments", "30", "--area",
                                                              "0.1"]):
        code = main(["explain", "--model", "synthetic-cnn", "--image", "synthetic:2", "--out",
                     str(tmp_path / "bad"), *bad])
        assert code == 2 and "--mode regions" in capsys.readouterr().err, bad
    assert not (tmp_path / "bad").exists()


def test_cli_auto_mode(tmp_path, capsys):
    """--mode auto (the default): regions on photo-sized inputs, per-image on small ones or
    when a per-image flag is given, regions when --segments is."""
    from circuitlab.cli import main
    from circuitlab.cli.explain import resolved_mode
    assert resolved_mode("auto", 224) == resolved_mode("auto", 128) == "regions"
    assert resolved_mode("auto", 127) == resolved_mode("auto", 32) == "per-image"
    assert resolved_mode("per-image", 224) == "per-image"
    assert resolved_mode("amortized", 224) == "amortized"
    runs = {"small": ([], "per-image"), "segments": (["--segments", "24"], "regions"),
            "steps": (["--steps", "30"], "per-image")}
    for name, (flags, mode) in runs.items():
        code = main(["explain", "--model", "synthetic-cnn", "--image", "synthetic:2", "--out",
                     str(tmp_path / name), "--json", *flags])
        assert code == 0, capsys.readouterr().err
        assert json.loads((tmp_path / name / "metrics.json").read_text())["mode"] == mode


def test_the_activation_term_is_the_paper_distance_over_the_mean_colour():
    """RegionSearch(act=w) scores a set by its worst log p_target less w x the activation
    distance at the family's taps, which an independent traced run reproduces."""
    from circuitlab.explain.config import default_alphas, default_distances
    from circuitlab.explain.regions import _Scorer
    from circuitlab.kernels.reference import activation_matching
    hm = circuitlab.load_model("synthetic-cnn")
    x = circuitlab.synthetic.make_dataset(1, seed=5).normalized()
    search = RegionSearch(segments=24, act=0.7)
    labels = superpixels(hm, x, search)
    t = int(hm(x).argmax(-1))
    score = _Scorer(hm, x, labels, t, search, seed=1)
    sets = [{0, 1}, {2}, set(range(int(labels.max()) + 1))]
    logp, _, value = score(sets)
    taps = list(hm.taps)
    _, cx = hm.run_with_cache(x, names=taps)
    for s, lp, v in zip(sets, logp, value):
        m = score.mask(s)
        _, ce = hm.run_with_cache(m * x, names=taps)     # the first fill is the mean colour
        d = activation_matching([cx[n] for n in taps], [ce[n] for n in taps],
                                default_alphas(len(taps)), default_distances(len(taps), False),
                                [hm.point(n).unit_axis for n in taps])
        assert float(v) == pytest.approx(float(lp.min()) - 0.7 * float(d), rel=1e-4, abs=1e-5)
    assert float(value[-1]) == pytest.approx(float(logp[-1].min()), abs=1e-4)  # whole image


def test_the_cli_default_is_the_search_default():
    from circuitlab.cli.explain import SEGMENTS
    assert SEGMENTS == RegionSearch().segments


def test_the_finer_pass_keeps_whole_pieces_each_needed(setup):
    """With ``refine`` the mask is made of the finer SLIC's superpixels cut to the coarse
    mask, holds over every fill and needs each piece; it lies inside the coarse mask."""
    hm, x, _, coarse = setup
    search = replace(SEARCH, refine=64, refine_above=0.0)
    ex = explain_regions(hm, x, search, seed=3)
    with torch.no_grad():
        p_image = hm(x).softmax(-1).gather(1, ex.target[:, None]).squeeze(1)
    assert torch.equal(ex.found, coarse.found)
    assert any(r["step"] == "refine" for t in ex.search for r in t)
    for i in torch.nonzero(ex.found).flatten().tolist():
        xi, m, t = x[i:i + 1], ex.mask[i:i + 1], int(ex.target[i])
        assert bool((m <= coarse.mask[i:i + 1]).all())
        # the pieces: the finer SLIC's superpixels cut to the coarse mask (-1: outside it)
        pieces = np.where(coarse.mask[i, 0].numpy() > 0,
                          superpixels(hm, xi, replace(search, segments=search.refine)), -1)
        for s in np.unique(pieces):
            inside = m[0, 0][torch.from_numpy(pieces == s)]
            assert bool((inside == inside[0]).all())
        fills = make_backgrounds(xi, hm.data_config, SEARCH.fills,
                                 torch.Generator().manual_seed(3))
        floor = SEARCH.confidence * float(p_image[i])
        assert _holds(hm, xi, m, t, fills, floor)
        for s in np.unique(pieces[m[0, 0].numpy() > 0]):
            assert not _holds(hm, xi, m * torch.from_numpy(pieces != s).float(), t, fills,
                              floor)

