"""The default readout: the smallest circuit that keeps the contrast, checked against a model
whose answer is known and by brute force, and on the trained synthetic CNN against the
validation it must agree with."""
import itertools

import pytest
import torch
from torch import nn

import circuitlab
from circuitlab import HookedModel
from circuitlab.circuits import ReadoutConfig, faithfulness, read_circuit, smallest_faithful
from circuitlab.errors import CircuitlabError

# each channel of layer "a" carries the image's evidence with this weight: the smallest set
# keeping 0.8 of the contrast is {0, 1} (0.81); no single channel does (0.5)
WEIGHTS = [50.0, 31.0, 10.0, 5.0, 2.0, 1.0, 0.5, 0.5]


class _Evidence(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 2)
        with torch.no_grad():
            self.a.weight.zero_()
            self.a.weight[:, 0] = 1.0                   # every channel copies input channel 0
            self.fc.weight.zero_()
            self.fc.weight[1] = torch.tensor(WEIGHTS)
            self.fc.bias.copy_(torch.tensor([40.0, 0.0]))

    def forward(self, x):
        return self.fc(self.pool(self.a(x)).flatten(1))


@pytest.fixture
def evidence():
    hm = HookedModel(_Evidence(), data_config={"input_size": (3, 4, 4)})
    x = torch.zeros(1, 3, 4, 4)
    x[:, 0] = 2.0
    refs = torch.zeros(3, 3, 4, 4)
    refs[:, 0] = torch.tensor([0.0, 0.2, 0.4])[:, None, None]
    return hm, x, refs


def _kept(hm, x, refs, units):
    """Contrast kept and top-1 with only ``units`` of "a" kept: the plain validation."""
    c = circuitlab.circuits.Circuit(
        [{"layer": "a", "unit": u, "energy": 0.0, "attribution": 0.0, "kind": "unit"}
         for u in units], [], {"layers": "a", "target": 1})
    row = faithfulness(hm, x, c, reference=refs, n_random=0).set_index("test").loc["keep"]
    return float(row["contrast_fraction"]), bool(row["top1_kept"])


def test_the_smallest_circuit_of_a_known_model(evidence):
    hm, x, refs = evidence
    found = smallest_faithful(hm, x, ["a"], refs)
    assert found.units == {"a": [0, 1]} and found.n_units == 2 and found.found
    assert found.contrast == pytest.approx(0.81, abs=1e-5) and found.top1_kept
    # brute force over every circuit of one unit: none keeps 0.8 of the contrast
    assert max(_kept(hm, x, refs, [u])[0] for u in range(8)) == pytest.approx(0.5, abs=1e-5)
    assert _kept(hm, x, refs, [0, 1]) == (pytest.approx(0.81, abs=1e-5), True)
    probed = dict((n, c) for n, c, _ in found.probes)
    assert probed[1] < 0.8 <= probed[2]                # the size below it was tried and failed
    assert found.passes["forward_backward"] == 8       # prune 10 % of 8 units: one per round


def test_the_threshold_moves_the_size(evidence):
    hm, x, refs = evidence
    assert smallest_faithful(hm, x, ["a"], refs, faithfulness=0.5).units == {"a": [0]}
    assert smallest_faithful(hm, x, ["a"], refs, faithfulness=0.95).n_units == 4
    every = list(itertools.chain.from_iterable(
        itertools.combinations(range(8), k) for k in range(1, 4)))
    best3 = max(_kept(hm, x, refs, list(s))[0] for s in every if len(s) == 3)
    assert best3 < 0.95                                # so 4 is the smallest at 0.95


def test_read_circuit_defaults_to_it_and_says_so(evidence):
    hm, x, refs = evidence
    c = read_circuit(hm, x, reference=refs, layers=["a"])
    assert c.units == {"a": [0, 1]} and c.meta["select_by"] == "faithful"
    assert c.meta["search_units"] == 2 and c.meta["search_fraction"] == 0.25
    assert list(c.nodes.loc[c.nodes["kind"] == "unit", "unit"]) == [0, 1]   # strongest first
    assert "search_fraction" in c.to_networkx().graph          # scalars reach graph exports
    with pytest.raises(CircuitlabError, match="needs reference images"):
        read_circuit(hm, x, layers=["a"])
    with pytest.raises(CircuitlabError, match="select_by='energy'"):
        read_circuit(hm, x, reference=refs, k=4)
    with pytest.raises(CircuitlabError, match="other classes"):
        read_circuit(hm, x, reference=x.repeat(2, 1, 1, 1), layers=["a"])
    with pytest.raises(CircuitlabError, match="'mean' or 'zero'"):
        read_circuit(hm, x, reference=refs, layers=["a"], ablation="resample")


def test_refinement_never_goes_below_the_true_minimum(evidence):
    hm, x, refs = evidence
    found = smallest_faithful(hm, x, ["a"], refs, refine_steps=20)
    assert found.units == {"a": [0, 1]} and found.contrast == pytest.approx(0.81, abs=1e-5)
    n, contrast, _ = found.probes[-1]                  # it tried one unit, and that failed
    assert n == 1 and contrast < 0.8


def test_refined_circuits_are_smaller_and_still_pass_the_validation(trained_cnn):
    """Refinement never grows a circuit, and shrinks some: on a few images, since which
    ones the searched circuit is already as small as gates get depends on the trained
    weights, which differ between CPUs (float rounding in training)."""
    hm, _, refs = trained_cnn
    data = circuitlab.synthetic.make_dataset(4, seed=123).normalized()
    shrunk = 0
    for i in range(data.shape[0]):
        x = data[i:i + 1]
        plain = read_circuit(hm, x, reference=refs, edges="none")
        refined = read_circuit(hm, x, reference=refs, edges="none", refine_steps=30)
        assert refined.meta["search_units"] <= plain.meta["search_units"]
        shrunk += refined.meta["search_units"] < plain.meta["search_units"]
        keep = faithfulness(hm, x, refined, reference=refs, n_random=0).set_index("test") \
            .loc["keep"]
        assert keep["contrast_fraction"] >= 0.8 and keep["top1_kept"]
    assert shrunk >= 1
    assert keep["contrast_fraction"] == pytest.approx(refined.meta["search_contrast"],
                                                      abs=1e-4)


def test_readout_config_checks_its_settings():
    assert ReadoutConfig().select_by == "faithful"
    assert ReadoutConfig(select_by="energy", k=4).replace(edges="none").k == 4
    for bad, message in [({"select_by": "magic"}, "select_by must be"),
                         ({"faithfulness": 0}, "faithfulness"),
                         ({"select_by": "energy", "k": 0}, "k must be"),
                         ({"prune": 1.0}, "prune"),
                         ({"refine_steps": 5}, "refine_steps"),
                         ({"rank_by": "magic"}, "rank_by must be"),
                         ({"select_by": "energy", "rank_by": "eap-ig"}, "own score"),
                         ({"ig_steps": 0}, "ig_steps")]:
        with pytest.raises(CircuitlabError, match=message):
            ReadoutConfig(**bad)
    with pytest.raises(CircuitlabError, match="unknown readout settings"):
        ReadoutConfig().replace(kk=3)


@pytest.fixture(scope="module")
def trained_cnn(cnn):
    hm, _, refs = cnn                   # the session's model and references, two images
    return hm, circuitlab.synthetic.make_dataset(2, seed=123).normalized(), refs


def test_the_search_and_the_validation_agree_on_a_trained_cnn(trained_cnn):
    hm, data, refs = trained_cnn
    for i in range(2):
        x = data[i:i + 1]
        c = read_circuit(hm, x, reference=refs, edges="none")
        keep = faithfulness(hm, x, c, reference=refs, n_random=0).set_index("test").loc["keep"]
        assert keep["contrast_fraction"] >= 0.8 and keep["top1_kept"]
        assert keep["contrast_fraction"] == pytest.approx(c.meta["search_contrast"], abs=1e-4)
        # the size is the smallest the bisection saw pass: its largest failing probe lies
        # within the tolerance (1 % of the units) below it
        found = smallest_faithful(hm, x, hm.taps, refs)
        assert {n: sorted(u) for n, u in found.units.items()} == c.units
        fails = [n for n, cn, top1 in found.probes if not (cn >= 0.8 and top1)]
        assert fails and found.n_units - max(fails) <= max(1, int(0.01 * found.total))
        assert all(n < found.n_units for n in fails)
