"""Rankings of units and the frontier: EAP-IG against its closed form on a model where
integrated gradients are exact, the rankings against each other on the trained CNN, and the
frontier table."""
import pytest
import torch
from torch import nn

from circuitlab import HookedModel
from circuitlab.circuits import RANKINGS, frontier, prepare, rank_units, smallest
from circuitlab.errors import CircuitlabError

W = torch.tensor([1.0, -3.0, 0.5, 2.0, -0.25])


class _Square(nn.Module):
    """z_1 = sum_u w_u a_u^2 over one position: the effect of ablating unit u to m_u is
    w_u (a_u^2 - m_u^2), which integrated gradients recover exactly (the gradient is linear
    along the path, so the midpoint rule is exact) and a gradient at the image does not."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 5, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        with torch.no_grad():
            self.a.weight.copy_(torch.tensor([1.0, 0.2, 2.0, 0.7, 3.0]).view(5, 1, 1, 1))
            self.a.bias.copy_(torch.tensor([0.5, 2.0, -1.0, 0.1, 0.3]))

    def forward(self, x):
        a = self.pool(self.a(x)).flatten(1)
        z = (W * a ** 2).sum(1, keepdim=True)
        return torch.cat([torch.zeros_like(z) + 1.0, z], 1)


def test_eap_ig_is_exact_where_integrated_gradients_are():
    hm = HookedModel(_Square(), data_config={"input_size": (1, 1, 1), "mean": (0.0,),
                                             "std": (1.0,)})
    x = torch.full((1, 1, 1, 1), 3.0)
    refs = torch.tensor([0.0, 0.2, -0.2]).view(3, 1, 1, 1)
    s = prepare(hm, x, ["a"], refs, target=1)
    with torch.no_grad():
        _, c = hm.run_with_cache(x, names=["a"])
    a, m = c["a"].flatten(), s.ablated.values["a"].flatten()
    effect = (W * (a ** 2 - m ** 2)).abs()
    gradient_only = (W * 2 * a * (a - m)).abs()           # plain attribution's estimate
    want = [("a", int(u)) for u in effect.argsort(descending=True)]
    assert rank_units(s.ablated, s.x, 1, "eap-ig", steps=4) == want
    assert rank_units(s.ablated, s.x, 1, "attribution") == [
        ("a", int(u)) for u in gradient_only.argsort(descending=True)]
    assert want != rank_units(s.ablated, s.x, 1, "attribution")   # the test can tell them apart


def test_every_ranking_orders_every_unit_once(cnn):
    hm, x, refs = cnn
    s = prepare(hm, x, hm.taps, refs)
    every = {(n, u) for n in hm.taps for u in range(hm.n_units(n))}
    for by in RANKINGS:
        order = rank_units(s.ablated, s.x, s.target, by)
        assert len(order) == len(every) and set(order) == every, by
    # energy and random take the same share of every layer at any cut
    top = s.ablated.top(rank_units(s.ablated, s.x, s.target, "random"), 40)
    assert {n: len(u) for n, u in top.items()} == {"layer2": 8, "layer3": 16, "layer4": 16}
    with pytest.raises(CircuitlabError, match="rank_by must be"):
        rank_units(s.ablated, s.x, s.target, "magic")


def test_the_frontier_table(cnn):
    hm, x, refs = cnn
    df = frontier(hm, x, hm.taps, refs, fractions=(0.2, 0.6, 0.9),
                  rankings=("iterative", "eap-ig", "random"),
                  ablations=("mean", "resample"), draws=2)
    assert len(df) == 3 * 2 * 3
    piv = df.set_index(["ranking", "ablation", "fraction"])["contrast"]
    for ab in ("mean", "resample"):
        for r in ("iterative", "eap-ig"):
            assert piv[(r, ab, 0.6)] > piv[("random", ab, 0.6)] + 0.2
            assert piv[(r, ab, 0.2)] <= piv[(r, ab, 0.6)] <= piv[(r, ab, 0.9)] + 0.05
    assert not piv.xs("mean", level=1).equals(piv.xs("resample", level=1))
    # the row for the mean ablation is what the search's own probe says
    s = prepare(hm, x, hm.taps, refs)
    order = rank_units(s.ablated, s.x, s.target, "iterative")
    assert piv[("iterative", "mean", 0.6)] == pytest.approx(
        s.probe_top(order, round(0.6 * s.ablated.total))[0], abs=1e-6)
    need = smallest(df, 0.8).set_index(["ranking", "ablation"])["fraction_for_0.8"]
    assert need[("iterative", "mean")] == 0.9 and need.isna()[("random", "mean")]
    with pytest.raises(CircuitlabError, match="unknown ranking"):
        frontier(hm, x, hm.taps, refs, rankings=("magic",))
