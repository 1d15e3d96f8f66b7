"""Every objective term against a value computed by hand on tiny tensors."""
import math

import pytest
import torch

from circuitlab import CircuitlabError
from circuitlab.explain import MaskUNet, binarize_ste, losses
from circuitlab.backgrounds import gaussian_blur, make_backgrounds


def test_mse_and_zmse_by_hand():
    a = torch.tensor([[[[1.0, 3.0]]]])          # (B=1, C=1, H=1, W=2)
    b = torch.tensor([[[[2.0, 2.0]]]])
    assert losses.activation_distance(a, b, "mse").item() == pytest.approx(1.0)
    # z(a) = (-1, 1) (mean 2, population std 1); b is constant: z(b) = (0, 0) -> MSE 1,
    # up to the eps added to the std
    assert losses.activation_distance(a, b, "zmse").item() == pytest.approx(1.0, rel=1e-5)
    # z-scoring ignores scale and offset per channel
    assert losses.activation_distance(a, 3 * a + 7, "zmse").item() == pytest.approx(0, abs=1e-9)


def test_cosine_and_kl_over_channels_by_hand():
    a = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1).repeat(1, 1, 1, 2)   # 2 positions
    b = torch.tensor([[1.0, 1.0], [0.0, 1.0]]).reshape(1, 2, 1, 2)  # pos0 (1,0), pos1 (1,1)
    # cos at pos0 = 1, pos1 = 1/sqrt(2) -> 1 - mean
    expect = 1 - (1 + 1 / math.sqrt(2)) / 2
    assert losses.activation_distance(a, b, "cosine").item() == pytest.approx(expect, rel=1e-6)
    pa = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    pb1 = torch.softmax(torch.tensor([1.0, 1.0]), 0)
    kl0 = 0.0
    kl1 = float((pa * (pa / pb1).log()).sum())
    assert losses.activation_distance(a, b, "kl").item() == pytest.approx((kl0 + kl1) / 2,
                                                                          rel=1e-6)
    # token tensors (B, N, C): channels last
    t = a.flatten(2).transpose(1, 2)
    u = b.flatten(2).transpose(1, 2)
    assert losses.activation_distance(t, u, "cosine", channel_dim=2).item() == pytest.approx(
        expect, rel=1e-6)
    with pytest.raises(CircuitlabError):
        losses.activation_distance(a, b, "l7")


def test_activation_matching_weights_layers():
    a1, b1 = torch.zeros(1, 1, 1, 2), torch.ones(1, 1, 1, 2)        # mse 1
    a2, b2 = torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), 2.)  # mse 4
    total = losses.activation_matching([a1, a2], [b1, b2], [1.0, 8.0], ["mse", "mse"], [1, 1])
    assert total.item() == pytest.approx(1 + 32)


def test_ce_and_temperature_kl_by_hand():
    le = torch.tensor([[2.0, 0.0]])
    assert losses.class_ce(le, torch.tensor([0])).item() == pytest.approx(
        -math.log(math.exp(2) / (math.exp(2) + 1)))
    lx = torch.tensor([[0.0, 0.0]])
    px = torch.tensor([0.5, 0.5])
    pe = torch.softmax(le[0] / 2, 0)
    expect = float((px * (px / pe).log()).sum()) * 4
    assert losses.logit_kl(lx, le, 2.0).item() == pytest.approx(expect, rel=1e-6)
    assert losses.logit_kl(le, le).item() == pytest.approx(0, abs=1e-7)


def test_priors_by_hand():
    p = torch.tensor([[[[0.0, 1.0], [0.5, 1.0]]]])
    assert losses.area(p).item() == pytest.approx(2.5 / 4)
    assert losses.binarization(p).item() == pytest.approx(0.25 / 4)
    # rows: |0.5-0|, |1-1| -> mean 0.25; cols: |1-0|, |1-0.5| -> mean 0.75
    assert losses.total_variation(p, 4).item() == pytest.approx(1.0)
    # diagonals: |1-0| = 1 and |0.5-1| = 0.5, each a single pair
    assert losses.total_variation(p, 8).item() == pytest.approx(1.0 + 1.5 / math.sqrt(2))
    # sorted (1, 1, .5, 0) against two cells on (1, 1, 0, 0): gap .25 / 4
    assert losses.area_rank(p, 0.5).item() == pytest.approx(0.25 / 4)
    with pytest.raises(CircuitlabError):
        losses.total_variation(p, 6)


def test_necessity_hinge_by_hand():
    lx = torch.tensor([[2.0, 0.0]])
    y = torch.tensor([0])
    px = math.exp(2) / (math.exp(2) + 1)
    lc = torch.tensor([[1.0, 0.0]])
    pc = math.e / (math.e + 1)
    assert losses.necessity_hinge(lx, lc, y, "prob", 0.5).item() == pytest.approx(
        max(0.0, pc / px - 0.5))
    assert losses.necessity_hinge(lx, torch.tensor([[-5.0, 0.0]]), y, "prob").item() == 0
    assert losses.necessity_hinge(lx, lc, y, "logit", 1.0).item() == pytest.approx(0.0)
    assert losses.necessity_hinge(lx, lc, y, "logit", 2.0).item() == pytest.approx(1.0)


def test_straight_through_estimator():
    p = torch.tensor([0.2, 0.5, 0.7], requires_grad=True)
    m = binarize_ste(p)
    assert m.tolist() == [0.0, 0.0, 1.0]
    (m * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert p.grad.tolist() == [1.0, 2.0, 3.0]


def test_keep_top_is_an_exact_budget_with_a_straight_through_gradient():
    from circuitlab.explain.generator import keep_top_ste
    p = torch.tensor([[[[0.9, 0.1], [0.4, 0.4]]], [[[0.2, 0.3], [0.8, 0.7]]]],
                     requires_grad=True)
    m = keep_top_ste(p, 0.5)
    assert m.tolist() == [[[[1.0, 0.0], [1.0, 0.0]]], [[[0.0, 0.0], [1.0, 1.0]]]]
    (m * torch.arange(8.0).view(2, 1, 2, 2)).sum().backward()
    assert p.grad.flatten().tolist() == list(range(8))
    assert keep_top_ste(p, 1e-6).flatten(1).sum(1).tolist() == [1.0, 1.0]   # at least one
    assert keep_top_ste(p, 1.0).flatten(1).sum(1).tolist() == [4.0, 4.0]


def test_area_budget_schedule_and_bad_values():
    from circuitlab import HookedModel, synthetic
    from circuitlab.explain import preset
    from circuitlab.explain.objective import Objective
    hm = HookedModel(synthetic.build("cnn"), data_config=synthetic.DATA_CONFIG)
    x = synthetic.make_dataset(1, seed=1).normalized()
    obj = Objective(hm, x, preset("default", "cnn", area_budget=0.04, steps=11,
                                  budget_warmup=0.5))
    assert obj.budget_at(1) == 1.0 and obj.budget_at(6) == pytest.approx(0.04)
    assert obj.budget_at(4) == pytest.approx(0.04 ** 0.6) and obj.budget_at(11) == 0.04
    assert not obj.at_budget(5) and obj.at_budget(6)
    p = torch.rand(1, 1, 32, 32)
    loss, terms, out = obj(p, 11)
    assert out.m_low.sum() == round(0.04 * 32 * 32) and "area" not in terms
    for bad in (dict(area_budget=0.0), dict(area_budget=1.5), dict(budget_warmup=2.0)):
        with pytest.raises(CircuitlabError, match="area_budget|budget_warmup"):
            preset("default", **bad)
    large = preset("default", "cnn", 224, area_budget=0.05)
    assert large.area_budget == 0.05 and large.steps > preset("default", "cnn", 224).steps


def test_the_robustness_term_draws_its_backgrounds_apart_from_the_metrics():
    """The robustness term's fixed backgrounds are not the draws the metrics judge with (at
    seed 0 they once were: the mask was fitted to the very noise it was scored on)."""
    from circuitlab import HookedModel, synthetic
    from circuitlab.backgrounds import fill_generator
    from circuitlab.explain import preset
    from circuitlab.explain.objective import Objective
    hm = HookedModel(synthetic.build("cnn"), data_config=synthetic.DATA_CONFIG)
    x = synthetic.make_dataset(1, seed=1).normalized()
    cfg = preset("paper", "cnn")                      # grey, gaussian, uniform; rob > 0
    obj = Objective(hm, x, cfg)
    judged = make_backgrounds(x, hm.data_config, cfg.backgrounds, fill_generator(0, "metrics"))
    own = make_backgrounds(x, hm.data_config, cfg.backgrounds, fill_generator(0, "objective"))
    assert torch.equal(obj.backgrounds[:, 0], own)
    for kind in (1, 2):                               # the noise kinds
        assert not torch.allclose(obj.backgrounds[kind, 0], judged[kind])


@pytest.mark.parametrize("depth, stride, size", [(4, 1, 64), (3, 4, 64), (2, 2, 50)])
def test_generator_shapes_init_and_determinism(depth, stride, size):
    torch.manual_seed(0)
    a = MaskUNet(3, width=4, depth=depth, out_stride=stride, init_keep=0.9)
    torch.manual_seed(0)
    b = MaskUNet(3, width=4, depth=depth, out_stride=stride, init_keep=0.9)
    x = torch.randn(2, 3, size, size)
    out = a(x)
    assert out.shape == (2, 1, -(-size // stride), -(-size // stride))
    torch.testing.assert_close(torch.sigmoid(out), torch.full_like(out, 0.9))
    torch.testing.assert_close(out, b(x), rtol=0, atol=0)
    with pytest.raises(ValueError):
        MaskUNet(out_stride=3)


def test_backgrounds():
    cfg = {"mean": (0.5,) * 3, "std": (0.5,) * 3}
    x = torch.randn(2, 3, 40, 40)
    g = torch.Generator().manual_seed(0)
    r = make_backgrounds(x, cfg, ("grey", "gaussian", "uniform", "blur"), g)
    assert r.shape == (8, 3, 40, 40)
    assert r[:2].abs().max() == 0                          # grey = the mean = 0
    assert -1 <= r[2:6].min() and r[2:6].max() <= 1        # pixels in [0, 1]
    flat = torch.ones(1, 1, 9, 9)
    torch.testing.assert_close(gaussian_blur(flat, 2.0), flat)  # blur keeps constants
    rim = gaussian_blur(flat, 1.0, border="zeros")         # nothing outside the image
    corner, edge, inside = rim[0, 0, 0, 0], rim[0, 0, 0, 4], rim[0, 0, 4, 4]
    assert inside == pytest.approx(1.0) and corner < edge < 0.75
    assert corner == pytest.approx(edge ** 2)               # separable: both sides cut
    with pytest.raises(CircuitlabError, match="border"):
        gaussian_blur(flat, 1.0, border="wrap")


def test_presets():
    from circuitlab.explain import PRESETS, preset
    small, large = preset("default", "resnet", 32), preset("default", "resnet", 224)
    assert small.mask_size == 32 and large.mask_size == 56 and large.area > small.area
    assert preset("default", "resnet", 224, steps=7).steps == 7
    paper = preset("paper", "resnet", 224)
    assert paper == PRESETS["paper"] and paper.generator == "unet" and paper.steps == 880
    # under an area budget large inputs get one mask cell per pixel, small ones keep theirs
    assert preset("default", "resnet", 224, area_budget=0.05).mask_size == 224
    assert preset("default", "resnet", 32, area_budget=0.05).mask_size == 32
    assert (paper.act, paper.ce, paper.kl, paper.area, paper.bin, paper.tv, paper.rob) == (
        10, 15, 5, 100, 1, 500, 100)
    with pytest.raises(CircuitlabError, match="unknown preset"):
        preset("fast")
    with pytest.raises(CircuitlabError, match="unknown explain settings"):
        preset("default", stpes=3)


def test_explanation_ranking():
    from circuitlab.explain.config import ExplainConfig
    from circuitlab.explain.optimize import Explanation
    from circuitlab.metrics import binarize_at_area
    mask = torch.zeros(1, 1, 40, 40)
    mask[..., :6, :6] = 1          # a cluster in the corner ...
    mask[..., 17:23, 17:23] = 1    # ... and one of the same size in the middle
    soft = torch.full((1, 1, 10, 10), 0.9)   # keep probabilities on a coarser grid
    ex = Explanation(mask=mask, soft=soft, explanation=mask, target=torch.zeros(1),
                     history=None, steps=1, seconds=0.0, config=ExplainConfig())
    r = ex.ranking()
    assert r.shape == mask.shape
    # at the mask's own area the ranking gives back the mask exactly
    torch.testing.assert_close(binarize_at_area(r, float(ex.area)), mask)
    # a smaller area keeps each cluster's dense core first, and a cluster in the corner
    # weighs what the same cluster in the middle does (a mirrored border would count the
    # corner one up to four times)
    half = binarize_at_area(r, float(ex.area) / 2)
    assert half[..., 18:22, 18:22].sum() == 16 and half[..., 1:5, 1:5].sum() == 16
    assert r[..., :6, :6].max() == pytest.approx(float(r[..., 17:23, 17:23].max()), abs=1e-4)
    # outside the mask the density orders the rest: next to a cluster before far away
    assert r[0, 0, 20, 24] > r[0, 0, 35, 35] and r[0, 0, 20, 24] < 1
