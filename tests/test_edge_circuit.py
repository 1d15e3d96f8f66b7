"""Edge circuits: the copy-batched edge ablation against one run per destination unit, the
edge scores against the exact effect of removing an edge where the model is linear, and the
search and the CLI end to end."""

import pytest
import torch
from torch import nn

import circuitlab
from circuitlab import HookedModel
from circuitlab.circuits import edge_attribution, prepare, read_circuit, smallest_edge_circuit
from circuitlab.circuits.edge_circuit import edge_probe, everything
from circuitlab.errors import CircuitlabError


def _oracle_logits(s, units, kept, image):
    """Edge ablation by brute force: every destination unit from its own run in which the
    sources not feeding it hold their ablated value, layer by layer."""
    ab, hm = s.ablated, s.ablated.hm
    layers, done = ab.layers, {}

    def fix(values):
        return [(n, (lambda a, _n, v=v: v)) for n, v in values.items()]

    def node(name, act):
        m = ab.keep_masks(units)[name].view(ab.shape(name, act))
        return torch.where(m, act, ab.values[name])

    with torch.no_grad():
        for t, name in enumerate(layers):
            grab = {}

            def read(a, n, grab=grab):
                grab[n] = a
            if t == 0 or not units[layers[t - 1]] or not units[name]:
                hm.run_with_hooks(image, fix(done) + [(name, read)])
                done[name] = node(name, grab[name])
                continue
            src = layers[t - 1]
            out = ab.values[name].clone().expand_as(grab.get(name, ab.values[name])).clone()
            for j in units[name]:
                feeds = torch.zeros(ab.sizes[src], dtype=torch.bool)
                for i in units[src]:
                    if (i, j) in kept.get((src, name), ()):
                        feeds[i] = True
                v = dict(done)
                v[src] = torch.where(feeds.view(ab.shape(src, done[src])), done[src],
                                     ab.values[src])
                hm.run_with_hooks(image, fix(v) + [(name, read)])
                out[:, j] = grab[name][:, j]
            done[name] = out
        return hm.run_with_hooks(image, fix(done))


def test_edge_ablation_equals_one_run_per_destination(cnn):
    hm, x, refs = cnn
    s = prepare(hm, x, hm.taps, refs[:4])
    g = torch.Generator().manual_seed(0)
    units = {n: sorted(torch.randperm(hm.n_units(n), generator=g)[:5].tolist())
             for n in hm.taps}
    every = everything(units, hm.taps)
    kept = {p: {e for e in es if torch.rand(1, generator=g) < 0.5} for p, es in every.items()}
    edges = [(p[0], i, p[1], j) for p, es in kept.items() for i, j in es]
    want = s.score(torch.cat([_oracle_logits(s, units, kept, img[None]) for img in s.batch]))
    got = edge_probe(s, units, edges)
    assert got[0] == pytest.approx(want[0], abs=1e-4) and got[3] == want[3]
    assert got[1] == pytest.approx(want[1], abs=1e-4)
    # every edge kept is the node circuit; none kept differs from it
    assert edge_probe(s, units, [(p[0], i, p[1], j) for p, es in every.items()
                                 for i, j in es])[0] == pytest.approx(
        s.probe(s.ablated.keep_masks(units))[0], abs=1e-5)
    assert abs(edge_probe(s, units, [])[0] - got[0]) > 1e-3


class _Linear(nn.Module):
    """Two 1x1 convolutions with no nonlinearity: removing an edge changes the logit by
    exactly what its attribution says."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(4, 3, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.pool(self.b(self.a(x))).flatten(1))


def test_edge_scores_are_the_exact_effects_in_a_linear_model():
    hm = HookedModel(_Linear(), data_config={"input_size": (3, 2, 2)})
    x = torch.ones(1, 3, 2, 2)        # the same at every position: no sign cancels
    refs = torch.rand(4, 3, 2, 2, generator=torch.Generator().manual_seed(1)) * 0.1
    s = prepare(hm, x, ["a", "b"], refs)
    units = {"a": list(range(4)), "b": list(range(3))}
    scores = edge_attribution(s, units)[("a", "b")]                     # (3, 4)
    every = [("a", i, "b", j) for i in range(4) for j in range(3)]
    z_all = hm.run_with_hooks(x, [])[0, s.target]
    for j in range(3):
        for i in range(4):
            logits = torch.cat([edge_probe_logits(s, units, [e for e in every
                                                            if e[1:4:2] != (i, j)])])
            assert float((z_all - logits[0, s.target]).abs()) == pytest.approx(
                float(scores[j, i]), rel=1e-3, abs=1e-5)


def edge_probe_logits(s, units, edges):
    from circuitlab.circuits.edge_circuit import _Copies, kept_edges
    with torch.no_grad():
        return _Copies(s, units, kept_edges(edges)).run(s.x)


def test_the_smallest_edge_circuit_passes_and_beats_random_edges(cnn):
    hm, x, refs = cnn
    s = prepare(hm, x, hm.taps, refs)
    every = {n: list(range(hm.n_units(n))) for n in hm.taps}
    found = smallest_edge_circuit(s, every)
    assert found.found and found.contrast >= 0.8 and found.top1_kept
    assert found.n_edges < found.total and found.random_contrast < found.contrast - 0.2
    fails = [m for m, c, t in found.probes if not (c >= 0.8 and t)]
    assert fails and found.n_edges - max(fails) <= max(1, int(0.01 * found.total))
    assert edge_probe(s, every, found.edges)[0] == pytest.approx(found.contrast, abs=1e-6)


@pytest.mark.slow
def test_read_circuit_with_attribution_edges(cnn):
    hm, x, refs = cnn
    c = read_circuit(hm, x, reference=refs, edges="attribution")
    assert set(c.edges["kind"]) <= {"attribution", "feature_class"}
    e = c.edges[c.edges["kind"] == "attribution"]
    assert len(e) == c.meta["edge_search_edges"] and c.meta["edge_search_contrast"] >= 0.8
    ends = set(zip(e["src_layer"], e["src_unit"])) | set(zip(e["dst_layer"], e["dst_unit"]))
    assert ends == {(n, u) for n, us in c.units.items() for u in us}
    with pytest.raises(CircuitlabError, match="leave select_by"):
        read_circuit(hm, x, reference=refs, edges="attribution", select_by="energy", k=3)


def test_edge_circuits_refuse_taps_that_a_skip_connection_jumps():
    from circuitlab.circuits.edge_circuit import edge_attribution as scores
    hm = circuitlab.load_model("synthetic-vit")
    x = circuitlab.synthetic.make_dataset(1, seed=3).normalized()
    refs = circuitlab.synthetic.make_dataset(8, seed=7).normalized()
    # the residual stream carries block 0's heads past its MLP into block 1's heads
    layers = ["blocks.0.attn.hook_z", "blocks.0.mlp.hook_post", "blocks.1.attn.hook_z"]
    s = prepare(hm, x, layers, refs)
    with pytest.raises(CircuitlabError, match="cut the network"):
        scores(s, {n: [0, 1] for n in layers})
