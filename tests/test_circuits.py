"""Circuit readout: edge scores by hand per layer type, effective edges, faithfulness against
a hand-written ablation, and export round trips."""
import networkx as nx
import pandas as pd
import pytest
import torch
from torch import nn

import circuitlab

from circuitlab import CircuitlabError, HookedModel
from circuitlab.circuits import Circuit, faithfulness, read_circuit, select
from circuitlab.circuits import edges as E


def test_weight_l1_standard_conv_by_hand():
    conv = nn.Conv2d(2, 3, 2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.arange(24, dtype=torch.float32).view(3, 2, 2, 2) - 12)
    l1 = E.weight_l1(conv)
    w = conv.weight.detach()
    assert l1.shape == (3, 2)
    assert l1[1, 0].item() == w[1, 0].abs().sum().item() == abs(-4) + 3 + 2 + 1
    energy = torch.tensor([2.0, 0.5])
    wl, s = E.scores(conv, energy, [1, 0], [2])
    assert wl.tolist() == [[l1[2, 1].item(), l1[2, 0].item()]]
    assert s.tolist() == [[l1[2, 1].item() * 0.5, l1[2, 0].item() * 2.0]]
    _, s = E.scores(conv, energy, [0], [2, 1], dst_scale=torch.tensor([0.0, 10.0, 3.0]))
    assert s[:, 0].tolist() == [l1[2, 0].item() * 2 * 3, l1[1, 0].item() * 2 * 10]
    v, i = E.scores(conv, energy, [1, 0], [2, 0], topk=1)      # best source per destination
    for row, d in enumerate([2, 0]):
        cand = [l1[d, 1].item() * 0.5, l1[d, 0].item() * 2.0]
        assert i[row, 0].item() == max(range(2), key=lambda n: (cand[n], -n))
        assert v[row, 0].item() == pytest.approx(max(cand))


def test_weight_l1_grouped_and_depthwise_are_block_diagonal():
    g = nn.Conv2d(4, 6, 3, groups=2, bias=False)          # out 0-2 read in 0-1, 3-5 read 2-3
    l1 = E.weight_l1(g)
    assert l1.shape == (6, 4)
    assert l1[0, 2] == 0 and l1[4, 1] == 0
    assert l1[4, 3].item() == pytest.approx(g.weight[4, 1].abs().sum().item())
    dw = nn.Conv2d(3, 3, 3, groups=3, bias=False)
    l1 = E.weight_l1(dw)
    assert torch.equal(l1 != 0, torch.eye(3, dtype=torch.bool))
    assert l1[2, 2].item() == pytest.approx(dw.weight[2, 0].abs().sum().item())
    lin = nn.Linear(3, 2)
    assert torch.equal(E.weight_l1(lin), lin.weight.detach().abs())
    with pytest.raises(CircuitlabError, match="effective"):
        E.weight_l1(nn.ReLU())


def test_select_top_k_and_mass():
    s = torch.tensor([1.0, 5.0, 3.0, 1.0])
    assert select(s, k=2) == [1, 2]
    assert select(s, mass=0.5) == [1]            # 5 / 10
    assert select(s, mass=0.6) == [1, 2]         # 8 / 10 >= 0.6
    with pytest.raises(CircuitlabError):
        select(s, mass=0)


class Chain(nn.Module):
    """conv ``a``, then a block ``b`` (conv, relu, conv) whose output is added to ``a``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        a = self.a(x)
        b = self.b(a) + a
        return self.fc(self.pool(b).flatten(1))


@pytest.fixture(scope="module")
def chain():
    torch.manual_seed(0)
    hm = HookedModel(Chain(), data_config={"input_size": (3, 8, 8)})
    return hm, torch.randn(1, 3, 8, 8)


def test_read_circuit_weight_edges_and_class_links_by_hand(chain):
    hm, x = chain
    c = read_circuit(hm, x, layers=["a", "b.0"], select_by="energy", k=2, edges="weight")
    a = hm.model.a(x)[0]
    energy = a.flatten(1).norm(dim=1)
    top = energy.argsort(descending=True)[:2].tolist()
    assert c.units["a"] == sorted(top)
    l1 = hm.model.b[0].weight.detach().abs().flatten(2).sum(-1)
    e = c.edges[c.edges["kind"] == "weight"].iloc[0]
    assert e.score == pytest.approx(l1[e.dst_unit, e.src_unit].item() * energy[e.src_unit].item(),
                                    rel=1e-5)
    # b is conv, relu, conv: its units are the second conv's, so the edge is the path
    # |W2| |W1| (1x1 kernels), not the first conv's rows
    c = read_circuit(hm, x, layers=["a", "b"], select_by="energy", k=2, edges="weight")
    path = hm.model.b[2].weight.detach().abs()[:, :, 0, 0] @ l1
    e = c.edges[c.edges["kind"] == "path"].iloc[0]
    assert e.score == pytest.approx(path[e.dst_unit, e.src_unit].item() *
                                    energy[e.src_unit].item(), rel=1e-5)
    # feature -> class: |W_fc[y, j]| * |h_j| on the pooled features
    y = int(hm(x).argmax())
    h = hm.model.pool(hm.model.b(a[None]) + a[None]).flatten()
    fc = c.edges[(c.edges["kind"] == "feature_class") & (c.edges["dst_unit"] == y)]
    for r in fc.itertuples():
        assert r.score == pytest.approx((hm.model.fc.weight[y, r.src_unit].abs() *
                                         h[r.src_unit].abs()).item(), rel=1e-5)


def test_effective_edges_equal_gradient_times_activation(chain):
    hm, x = chain
    c = read_circuit(hm, x, layers=["a", "b"], select_by="energy", k=4, edges="effective")
    a = hm.model.a(x).detach().requires_grad_(True)
    b = hm.model.b(a)                     # hook "b" is the block's output, before the add
    for d in (0, 3):
        (g,) = torch.autograd.grad(b[0, d].sum(), a, retain_graph=True)
        expect = (g * a).detach()[0].flatten(1).sum(1).abs()
        got = c.edges[(c.edges["dst_layer"] == "b") & (c.edges["dst_unit"] == d)]
        for r in got.itertuples():
            assert r.score == pytest.approx(expect[r.src_unit].item(), rel=1e-4, abs=1e-6)
    assert (c.edges.loc[c.edges["kind"] == "effective", "weight_l1"].isna()).all()


def test_faithfulness_equals_hand_written_ablation(chain):
    hm, x = chain
    c = read_circuit(hm, x, layers=["a", "b"], select_by="energy", k=2)
    refs = torch.randn(6, 3, 8, 8)
    df = faithfulness(hm, x, c, ablation="mean", reference=refs, n_random=2)
    y = c.meta["target"]
    ua, ub = c.units["a"], c.units["b"]
    with torch.no_grad():
        ma = hm.model.a(refs).mean(0, keepdim=True)
        mb = hm.model.b(hm.model.a(refs)).mean(0, keepdim=True)

        def run(keep):
            a = hm.model.a(x)
            keep_a = torch.zeros(4, dtype=torch.bool)
            keep_a[ua] = True
            a = torch.where(keep_a[None, :, None, None] == keep, a, ma)
            b = hm.model.b(a)
            keep_b = torch.zeros(4, dtype=torch.bool)
            keep_b[ub] = True
            b = torch.where(keep_b[None, :, None, None] == keep, b, mb)
            return hm.model.fc(hm.model.pool(b + a).flatten(1))[0]
        base = hm(x)[0]
        kept, removed = run(True), run(False)
    row = df.set_index("test")
    assert row.loc["keep", "logit_fraction"] == pytest.approx((kept[y] / base[y]).item(),
                                                              rel=1e-5)
    assert row.loc["remove", "logit_fraction"] == pytest.approx((removed[y] / base[y]).item(),
                                                                rel=1e-5)
    assert (df["test"] == "random_keep").sum() == 2


def test_exports_round_trip(chain, tmp_path):
    hm, x = chain
    c = read_circuit(hm, x, layers=["a", "b"], select_by="energy", k=3)
    c.save(tmp_path)
    for name in ("nodes.csv", "edges.csv", "circuit.graphml", "circuit.json"):
        assert (tmp_path / name).is_file()
    again = Circuit.from_csv(tmp_path / "nodes.csv", tmp_path / "edges.csv")
    pd.testing.assert_frame_equal(again.nodes, c.nodes)
    pd.testing.assert_frame_equal(again.edges, c.edges)
    pq = Circuit.from_parquet(tmp_path / "nodes.parquet", tmp_path / "edges.parquet")
    pd.testing.assert_frame_equal(pq.nodes, c.nodes)
    pd.testing.assert_frame_equal(pq.edges, c.edges)
    j = Circuit.from_json((tmp_path / "circuit.json").read_text())
    pd.testing.assert_frame_equal(j.edges, c.edges)
    assert j.meta == c.meta
    g = nx.read_graphml(tmp_path / "circuit.graphml")
    assert g.number_of_edges() == len(c.edges) and g.number_of_nodes() == len(c.nodes)
    assert c.edges.dtypes["score"] == "float64" and str(c.edges.dtypes["src_layer"]) == "string"


def test_bad_requests_are_one_line_errors(chain):
    hm, x = chain
    with pytest.raises(CircuitlabError, match="one image"):
        read_circuit(hm, x.repeat(2, 1, 1, 1))
    with pytest.raises(CircuitlabError, match="select_by"):
        read_circuit(hm, x, select_by="magic")
    with pytest.raises(CircuitlabError):
        read_circuit(hm, x, layers=["nope"])


def test_patch_units_exact_by_hand_and_attribution_exact_where_linear(chain):
    from circuitlab.circuits import ablate_units, agreement, patch_units
    hm, clean = chain
    corrupt = torch.randn(1, 3, 8, 8)
    df = patch_units(hm, clean, corrupt, "b")
    y = int(hm(clean).argmax())
    with torch.no_grad():
        a_x = hm.model.a(corrupt)
        b_c, b_x = hm.model.b(hm.model.a(clean)), hm.model.b(a_x)
        base = hm(corrupt)[0, y]
        for u in (0, 2):
            b = b_x.clone()
            b[:, u] = b_c[:, u]
            hand = hm.model.fc(hm.model.pool(b + a_x).flatten(1))[0, y] - base
            assert df.loc[u, "exact"] == pytest.approx(hand.item(), rel=1e-4, abs=1e-6)
    # after "b" the logit is linear in it (add, average pool, linear): the estimate is exact
    assert df["attribution"].to_numpy() == pytest.approx(df["exact"].to_numpy(), rel=1e-4,
                                                          abs=1e-5)
    assert agreement(df)["pearson"] == pytest.approx(1.0, abs=1e-6)
    ab = ablate_units(hm, clean, "a", ablation="zero")
    with torch.no_grad():
        a = hm.model.a(clean)
        a[:, 1] = 0
        hand = hm.model.fc(hm.model.pool(hm.model.b(a) + a).flatten(1))[0, y] - hm(clean)[0, y]
    assert ab.loc[1, "logit_change"] == pytest.approx(hand.item(), rel=1e-4, abs=1e-6)
    assert len(ab) == 4 and ab["top1_kept"].dtype == bool


def test_vit_circuit_heads_and_neurons_with_virtual_weights_by_hand():
    from helpers import get_model
    from circuitlab.circuits import transformer as T
    hm = get_model("vit")                                   # 4 blocks, 3 heads, 768 neurons
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    c = read_circuit(hm, x, select_by="energy", k=4)
    kinds = c.nodes.groupby("layer")["kind"].first()
    heads = [n for n in kinds.index if n.endswith("attn.hook_z")]
    neurons = [n for n in kinds.index if n.endswith("mlp.hook_post")]
    assert heads and neurons and (kinds[heads] == "head").all() and \
        (kinds[neurons] == "neuron").all()
    assert set(c.units) == set(heads) | set(neurons)
    virt = c.edges[c.edges["kind"] == "virtual"]
    assert len(virt) and set(virt["src_layer"]) | set(virt["dst_layer"]) <= set(heads + neurons)
    # one head -> neuron edge and one neuron -> head edge, by hand
    model = hm.model
    e = virt[virt["src_layer"].str.endswith("hook_z")].iloc[0]
    blk = model.get_submodule(e["src_layer"].rsplit(".attn", 1)[0])
    dblk = model.get_submodule(e["dst_layer"].rsplit(".mlp", 1)[0])
    h, j, dh = int(e["src_unit"]), int(e["dst_unit"]), blk.attn.head_dim
    w_out = blk.attn.proj.weight[:, h * dh:(h + 1) * dh]
    w_in = dblk.mlp.fc1.weight[j] * dblk.norm2.weight
    assert e["weight_l1"] == pytest.approx(float((w_in @ w_out).abs().sum()), rel=1e-5)
    assert e["score"] == pytest.approx(e["weight_l1"] * e["src_energy"], rel=1e-5)
    e = virt[virt["src_layer"].str.endswith("hook_post")].iloc[0]
    blk = model.get_submodule(e["src_layer"].rsplit(".mlp", 1)[0])
    dblk = model.get_submodule(e["dst_layer"].rsplit(".attn", 1)[0])
    n, h, d = int(e["src_unit"]), int(e["dst_unit"]), dblk.attn.qkv.in_features
    rows = torch.cat([dblk.attn.qkv.weight[q * d + h * dh: q * d + (h + 1) * dh]
                      for q in range(3)]) * dblk.norm1.weight
    expect = (rows @ blk.mlp.fc2.weight[:, n]).abs().sum()
    assert e["weight_l1"] == pytest.approx(float(expect), rel=1e-5)
    assert T.component_of("blocks.1.attn.hook_z") == ("blocks.1", "head")
    # the component circuit can be ablated like any other
    refs = torch.randn(4, 3, 32, 32)
    val = faithfulness(hm, x, c, reference=refs, n_random=2)
    assert set(val["test"]) == {"keep", "remove", "random_keep"}
    ch = read_circuit(hm, x, select_by="energy", k=4, units="channels")   # residual channels
    assert set(ch.nodes.loc[ch.nodes["kind"] == "unit", "layer"]) == set(hm.taps)
    with pytest.raises(CircuitlabError, match="units must be"):
        read_circuit(hm, x, units="bogus")


class Skip(nn.Module):
    """a -> b -> c, with a skip from a around b into c: (b, c) is not a cut."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Sequential(nn.Conv2d(4, 5, 1), nn.Tanh())
        self.c = nn.Conv2d(5, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        a = torch.tanh(self.a(x))
        c = torch.tanh(self.c(self.b(a)) + a)
        return self.fc(self.pool(c).flatten(1))


def test_effective_edges_in_one_pass_equal_one_pair_at_a_time(monkeypatch):
    from circuitlab.circuits import effective
    from circuitlab.circuits.effective import effective_edges as _effective_chain
    from circuitlab.circuits.effective import effective_pair as _effective
    torch.manual_seed(0)
    hm = HookedModel(Skip(), data_config={"input_size": (3, 6, 6)})
    x = torch.randn(1, 3, 6, 6)
    # the pooled features read c and, through the skip, a: that pair falls back
    pairs = [("a", "b.1", [0, 3, 4]), ("b.1", "c", [1, 2]), ("c", "hook_pooled", [0, 2])]
    fallback = []
    monkeypatch.setattr(effective, "effective_pair",
                        lambda *a: fallback.append(a[2:4]) or _effective(*a))
    got = _effective_chain(hm, x, pairs)
    assert fallback == [("c", "hook_pooled")]
    for src, dst, units in pairs:
        want = _effective(hm, x, src, dst, units)
        assert torch.allclose(got[(src, dst)], want, atol=1e-6), (src, dst)


class Linear4(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.pool(self.a(x)).flatten(1))


def test_learned_selection_finds_the_units_the_logit_needs():
    torch.manual_seed(0)
    m = Linear4()
    with torch.no_grad():
        m.a.weight.zero_()
        m.a.weight[2] = 1.0                                 # channel 2 reads the image
        m.a.weight[3] = 0.1
        m.a.bias.copy_(torch.tensor([50.0, 1.0, 0.0, 0.5]))  # channel 0: loud, input-free
        m.fc.weight.zero_()
        m.fc.bias.zero_()
        m.fc.weight[1, 2] = 3.0                             # class 1 reads channel 2 alone
        m.fc.weight[0, 0] = 0.01
    hm = HookedModel(m, data_config={"input_size": (3, 4, 4)})
    x = torch.rand(1, 3, 4, 4) + 0.5
    assert int(hm(x).argmax()) == 1
    kw = dict(layers=["a"], reference=-torch.rand(3, 3, 4, 4), steps=40)
    c = read_circuit(hm, x, select_by="learned", budget=0.25, ablation="zero", **kw)
    assert c.units == {"a": [2]}
    assert c.meta["budget"] == 0.25
    # energy: the loud one
    assert read_circuit(hm, x, select_by="energy", k=1, layers=["a"]).units == {"a": [0]}
    with pytest.raises(CircuitlabError, match="budget"):
        read_circuit(hm, x, select_by="learned", budget=0, **kw)
    with pytest.raises(CircuitlabError, match="reference"):
        read_circuit(hm, x, select_by="learned", layers=["a"], reference=None, steps=40)
    with pytest.raises(CircuitlabError, match="other classes"):        # no contrast to keep
        read_circuit(hm, x, select_by="learned", layers=["a"], reference=x.repeat(2, 1, 1, 1),
                     steps=40)
    val = faithfulness(hm, x, c, ablation="zero", reference=kw["reference"], n_random=3)
    keep = val[val["test"] == "keep"].iloc[0]
    assert keep["contrast_fraction"] == pytest.approx(1.0, abs=1e-5)  # channel 2 is all of it


def test_units_needed_one_layer_at_a_time_by_hand():
    from circuitlab.circuits import units_needed
    torch.manual_seed(0)
    m = Linear4()
    with torch.no_grad():
        m.fc.weight.zero_()
        m.fc.weight[1, 2], m.fc.weight[1, 3] = 3.0, 1.0   # class 1 reads channels 2 and 3
        m.fc.bias.zero_()
        m.a.bias.fill_(2.0)                                # class 1 is top-1
    hm = HookedModel(m, data_config={"input_size": (3, 4, 4)})
    x = torch.rand(1, 3, 4, 4)
    assert int(hm(x).argmax()) == 1
    a = m.a(x).mean((2, 3))[0].detach()
    df = units_needed(hm, x, {"a": [2, 0, 1, 3]}, fractions=(0.25, 0.5, 1.0), ablation="zero",
                      target=1)
    want = [3 * a[2] / (3 * a[2] + a[3]), 3 * a[2] / (3 * a[2] + a[3]), 1.0]
    assert df["logit_fraction"].tolist() == pytest.approx([float(w) for w in want], rel=1e-5)
    assert df["meets"].tolist() == [bool(w >= 0.8) for w in want]
    assert df["units"].tolist() == [1, 2, 4]


def test_a_layer_that_keeps_no_unit_has_no_edges_and_no_error():
    # the trained synthetic ViT's held-out image 4: the default readout keeps no MLP neuron
    # in blocks 2 and 3 (it raised IndexError on the empty index before)
    hm = circuitlab.load_model("synthetic-vit")
    x = circuitlab.synthetic.make_dataset(32, seed=123).normalized()[4:5]
    refs = circuitlab.synthetic.make_dataset(32, seed=7).normalized()
    c = read_circuit(hm, x, reference=refs)
    sizes = {layer: len(c.units.get(layer, [])) for layer in c.meta["layers"].split(",")}
    empty = [layer for layer, n in sizes.items() if n == 0]
    assert empty, f"no layer came out empty: {sizes}; pick another image for this test"
    touched = set(c.edges["src_layer"]) | set(c.edges["dst_layer"])
    assert not touched & set(empty) and len(c.edges) > 0
