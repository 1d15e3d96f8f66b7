"""A batch of images explained together: each image gets the mask it gets alone, stops on
its own, and the caller's random state is left as it was."""
import torch

from circuitlab import HookedModel, synthetic
from circuitlab.explain import explain
from circuitlab.explain.config import preset


def _setup(n=3):
    torch.manual_seed(0)
    hm = HookedModel(synthetic.build("cnn"), data_config=synthetic.DATA_CONFIG)
    return hm, synthetic.make_dataset(n, seed=5).normalized()


def test_each_image_of_a_batch_gets_the_mask_it_gets_alone():
    hm, x = _setup()
    # the robustness term on: each image draws its own noise backgrounds
    cfg = preset("default", hm.family.name, 32, steps=40, min_steps=5, patience=5, rob=1.0)
    together = explain(hm, x, cfg, seed=3)
    for i in range(len(x)):
        alone = explain(hm, x[i:i + 1], cfg, seed=3)
        assert torch.equal(together.mask[i:i + 1], alone.mask), i
        assert int(together.stopped[i]) == int(alone.stopped[0])
    # images leave the batch as they converge (the oracle: the steps each one ran alone)
    assert together.steps == int(together.stopped.max())
    assert list(together.history["images"])[-1] == int((together.stopped ==
                                                        together.steps).sum())


def test_explain_leaves_the_global_random_state_alone():
    hm, x = _setup(1)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    explain(hm, x, steps=3, seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_a_batch_row_is_a_batch_of_one():
    hm, x = _setup(2)
    ex = explain(hm, x, steps=3, seed=0)
    one = ex.row(1)
    assert one.mask.shape[0] == 1 and torch.equal(one.mask, ex.mask[1:2])
    assert one.target.tolist() == ex.target[1:].tolist()


def test_the_area_search_of_a_batch_is_each_images_own():
    import pytest

    from circuitlab.explain import minimize
    hm, x = _setup(2)
    cfg = preset("default", hm.family.name, 32, steps=30, min_steps=5, patience=5)
    free = explain(hm, x, cfg, seed=1)
    together = minimize(hm, x, free, steps=10, seed=1, confidence=0.0)
    for i in range(len(x)):
        alone = minimize(hm, x[i:i + 1], free.row(i), steps=10, seed=1, confidence=0.0)
        assert torch.equal(together.mask[i:i + 1], alone.mask), i
        mine, theirs = together.search[i], alone.search[0]
        # the image's own confidence comes from a batched forward: equal up to rounding
        assert [{**r, "confidence_ratio": pytest.approx(r["confidence_ratio"], rel=1e-3)}
                for r in theirs] == mine, i
    assert any(len(t) > 1 for t in together.search)     # some image halved more than once


def test_one_area_for_a_batch_is_every_images_own():
    from circuitlab.explain import explain_at_area
    hm, x = _setup(2)
    free = explain(hm, x, steps=20, seed=0)
    one = explain_at_area(hm, x, [0.1], base=free, steps=10, seed=0)
    assert torch.equal(one.mask, explain_at_area(hm, x, 0.1, base=free, steps=10,
                                                 seed=0).mask)

