"""Metrics against values worked out by hand on a model whose logits are known in closed form."""
import math

import pytest
import torch
from torch import nn

from circuitlab import HookedModel, metrics


class LeftRight(nn.Module):
    """logits = 10 * (mean of the left half, mean of the right half), over all channels."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1, bias=False)
        nn.init.constant_(self.conv.weight, 1 / 3)

    def forward(self, x):
        m = self.conv(x)
        w = m.shape[-1] // 2
        return 10 * torch.stack([m[..., :w].mean((1, 2, 3)), m[..., w:].mean((1, 2, 3))], 1)


@pytest.fixture
def setup():
    hm = HookedModel(LeftRight(), data_config={"input_size": (3, 8, 8), "mean": (0.5,) * 3,
                                               "std": (0.5,) * 3})
    x = torch.full((1, 3, 8, 8), 0.2)
    x[..., :4] = 1.0            # logits (10, 2): class 0 by the left half
    left = torch.zeros(1, 1, 8, 8)
    left[..., :4] = 1
    return hm, x, left


def _sig(z):
    return 1 / (1 + math.exp(-z))


def _kl(p, q):
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def test_evaluate_mask_by_hand(setup):
    hm, x, left = setup
    r = metrics.evaluate_mask(hm, x, left)
    assert r["area_fraction"].item() == 0.5 and r["label"].item() == 0
    assert bool(r["top1_kept"]) and r["confidence_image"].item() == pytest.approx(_sig(8))
    assert r["confidence_explanation"].item() == pytest.approx(_sig(10))     # logits (10, 0)
    assert r["kl"].item() == pytest.approx(_kl(_sig(8), _sig(10)), rel=1e-4)
    # complement: the right half alone, logits (0, 2)
    assert r["necessity_drop"].item() == pytest.approx(1 - _sig(-2) / _sig(8), rel=1e-5)
    # grey and blur fills keep class 0; so does noise on average, with the left half at 10
    assert r["sufficiency"].item() == 1.0
    r2 = metrics.evaluate_mask(hm, x, 1 - left)
    assert not bool(r2["top1_kept"])
    assert r2["necessity_drop"].item() == pytest.approx(1 - _sig(10) / _sig(8), abs=1e-6)


def test_deletion_and_insertion_by_hand(setup):
    hm, x, left = setup
    saliency = left + 0.01 * torch.arange(64.).view(1, 1, 8, 8) / 64  # left first
    steps = 4

    def p_after(f):  # a fraction f of pixels deleted, left ones first
        lm = max(0.0, 1 - 2 * f)
        rm = 0.2 * min(1.0, max(0.0, 2 - 2 * f))
        return _sig(10 * (lm - rm))
    p = [p_after(f) for f in (0, .25, .5, .75, 1)]
    expect = sum((a + b) / 2 for a, b in zip(p, p[1:])) / steps
    got = metrics.deletion_auc(hm, x, saliency, steps=steps)
    assert got.item() == pytest.approx(expect, rel=1e-5)
    assert metrics.deletion_auc(hm, x, 1 - saliency, steps=steps).item() > got.item()
    good = metrics.insertion_auc(hm, x, saliency, steps=steps, canvas="grey")
    bad = metrics.insertion_auc(hm, x, 1 - saliency, steps=steps, canvas="grey")
    assert good.item() > bad.item()


def test_pointing_iou_precision_and_binarize():
    gt = torch.zeros(2, 1, 4, 4)
    gt[:, :, :2, :2] = 1
    sal = torch.zeros(2, 1, 4, 4)
    sal[0, 0, 0, 0] = 1          # on the object
    sal[1, 0, 3, 3] = 1          # off it
    assert metrics.pointing_game(sal, gt).tolist() == [True, False]
    assert metrics.pointing_game(sal, gt, tolerance=2).tolist() == [True, True]
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, 0, :2, :] = 1        # 8 pixels, 4 on the object
    mask[1, 0, 0, 0] = 1         # 1 pixel, on the object
    assert metrics.iou(mask, gt).tolist() == [0.5, 0.25]
    assert metrics.mask_precision(mask, gt).tolist() == [0.5, 1.0]
    b = metrics.binarize_at_area(torch.arange(16.).view(1, 1, 4, 4), 0.25)
    assert b.sum() == 4 and b[0, 0, 3].tolist() == [1, 1, 1, 1]
    assert metrics.area_fraction(b).item() == 0.25


def test_per_fill_kept_and_confidence_ratio_by_hand(setup):
    hm, x, left = setup
    r = metrics.evaluate_mask(hm, x, left)
    assert r["confidence_ratio"].item() == pytest.approx(_sig(10) / _sig(8))
    # the left half alone decides: every fill of the right half keeps class 0
    assert {k: r[k].item() for k in r if k.startswith("kept_")} == {
        "kept_grey": 1.0, "kept_blur": 1.0, "kept_gaussian": 1.0, "kept_uniform": 1.0}
    # the right half alone over the grey fill: logits (0, 2), class 0 lost
    r = metrics.evaluate_mask(hm, x, 1 - left)
    assert r["kept_grey"].item() == 0.0 and not bool(r["top1_kept"])


def test_regions_count_8_connected_components():
    m = torch.zeros(2, 1, 12, 12)
    m[0, 0, 0:2, 0:2] = 1          # a 2x2 block
    m[0, 0, 2, 2] = 1              # touches it diagonally: same region
    m[0, 0, 6, 6] = 1              # a second region
    for i in range(6):             # six single pixels, far apart: eight regions
        m[1, 0, 2 * i, 0 if i % 2 else 11] = 1
    m[1, 0, 5:12, 5] = 1           # ... and a bar of 7 (the largest)
    r = metrics.regions(m)
    assert r["regions"].tolist() == [2, 7]
    # image 1: 13 kept pixels, the five largest regions are the bar and four singles
    assert r["top_regions_share"][1].item() == pytest.approx(11 / 13)
    assert metrics.regions(torch.zeros(1, 1, 4, 4))["top_regions_share"].item() == 1.0


def test_activation_similarity_is_one_and_zero_for_the_image_itself(setup):
    hm, x, left = setup
    same = metrics.activation_similarity(hm, x, x, names=["conv"])["conv"]
    assert same["cosine"].item() == pytest.approx(1.0, abs=1e-5)
    assert same["zmse"].item() == pytest.approx(0.0, abs=1e-5)
    # one channel: the cosine across channels is the sign agreement per position
    flipped = metrics.activation_similarity(hm, x, -x, names=["conv"])["conv"]
    assert flipped["cosine"].item() == pytest.approx(-1.0, abs=1e-5)
