"""Sparse dictionaries and circuits over their features: the dictionary recovers a sparse
code it was not told, the feature basis runs the network exactly when everything is kept,
an ablated feature is what an independent hook computes, and checkpoints round-trip."""
import pytest
import torch

import circuitlab
from circuitlab import features as F
from circuitlab.circuits import frontier, prepare
from circuitlab.errors import CircuitlabError


def _sparse_data(n=4000, d=8, m=16, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1)
    code = torch.zeros(n, m)
    idx = torch.stack([torch.randperm(m, generator=g)[:k] for _ in range(n)])
    code.scatter_(1, idx, torch.rand(n, k, generator=g) + 0.5)
    return code @ atoms


def test_a_dictionary_learns_a_sparse_code():
    acts = _sparse_data()
    sae = F.train_dictionary(acts, m=16, k=2, steps=1500, lr=3e-3)
    f = sae.encode(acts)
    assert int((f != 0).sum(1).max()) <= 2
    assert F.explained_variance(sae, acts) > 0.9
    untrained = F.SparseDictionary(8, 16, 2)
    with torch.no_grad():
        untrained.b_dec.copy_(acts.mean(0))
    assert F.explained_variance(untrained, acts) < 0.7        # what training bought
    with pytest.raises(CircuitlabError, match="k must lie"):
        F.SparseDictionary(8, 4, 5)


@pytest.fixture(scope="module")
def cnn_dicts():
    hm = circuitlab.load_model("synthetic-cnn")
    train = circuitlab.synthetic.make_dataset(64, seed=5).normalized()
    dicts = F.train_dictionaries(hm, hm.taps, train, size=2, k=4, steps=150,
                                 max_rows=20_000)
    x = circuitlab.synthetic.make_dataset(1, seed=123).normalized()
    refs = circuitlab.synthetic.make_dataset(8, seed=7).normalized()
    return hm, dicts, x, refs


def test_the_feature_basis_is_exact_and_its_ablation_is_what_it_says(cnn_dicts):
    hm, dicts, x, refs = cnn_dicts
    s = prepare(hm, x, hm.taps, refs, basis=dicts)
    ab = s.ablated
    assert ab.sizes == {n: dicts[n].m + 1 for n in hm.taps}
    everything = {n: list(range(sz)) for n, sz in ab.sizes.items()}
    with torch.no_grad():
        clean = hm(s.batch)
        kept = hm.run_with_hooks(s.batch, ab.hooks(ab.keep_masks(everything)))
    assert torch.allclose(kept, clean, atol=1e-4)
    # keep every feature of layer4 but its 3 first, and drop its error node; an independent
    # hook: decode the features with those three set to their reference mean, add the mean
    # reconstruction error over the references
    layer, sae = "layer4", dicts["layer4"]
    keep = dict(everything)
    keep[layer] = list(range(3, sae.m))
    with torch.no_grad():
        _, rc = hm.run_with_cache(refs, names=[layer])
        rr = F.vectors(rc[layer], 1)
        fr = sae.encode(rr).reshape(len(refs), -1, sae.m)
        err_mean = (rr - sae.decode(sae.encode(rr))).reshape(len(refs), -1, sae.d).mean(0)

        def oracle(act, _name):
            rows = F.vectors(act, 1)
            f = sae.encode(rows).reshape(act.shape[0], -1, sae.m)
            f[..., :3] = fr[..., :3].mean(0)
            out = sae.decode(f) + err_mean
            return F.unvectors(out.reshape(-1, sae.d), act, 1)
        want = hm.run_with_hooks(s.batch, [(layer, oracle)])
        got = hm.run_with_hooks(s.batch, ab.hooks(ab.keep_masks(keep)))
    assert torch.allclose(got, want, atol=1e-4)
    assert not torch.allclose(got, clean, atol=1e-2)


def test_feature_frontier_and_what_cannot_rank_features(cnn_dicts):
    hm, dicts, x, refs = cnn_dicts
    df = frontier(hm, x, hm.taps, refs, fractions=(0.1, 0.5, 1.0),
                  rankings=("iterative", "random"), basis=dicts)
    full = df[df["fraction"] == 1.0]
    assert (full["contrast"] - 1).abs().max() < 1e-4
    assert df["total"].iloc[0] == sum(d.m + 1 for d in dicts.values())
    s = prepare(hm, x, hm.taps, refs, basis=dicts)
    with pytest.raises(CircuitlabError, match="cannot rank"):
        circuitlab.circuits.rank_units(s.ablated, s.x, s.target, "eap-ig")
    with pytest.raises(CircuitlabError, match="no dictionary"):
        prepare(hm, x, hm.taps, refs, basis={"layer2": dicts["layer2"]})


def test_dictionaries_round_trip_through_a_checkpoint(cnn_dicts, tmp_path):
    hm, dicts, x, _ = cnn_dicts
    path = tmp_path / "d.pt"
    F.save_dictionaries(path, hm, dicts)
    back = F.load_dictionaries(path, hm)
    for n in dicts:
        assert torch.equal(back[n].W_dec, dicts[n].W_dec) and back[n].k == dicts[n].k
    with pytest.raises(CircuitlabError, match="--force|overwrite"):
        F.save_dictionaries(path, hm, dicts)
    other = circuitlab.load_model("synthetic-vit")
    with pytest.raises(CircuitlabError, match="holds dictionaries of"):
        F.load_dictionaries(path, other)
    torch.save({"format": "circuitlab.checkpoint/1", "kind": "model"}, tmp_path / "m.pt")
    with pytest.raises(CircuitlabError, match="not a circuitlab features checkpoint"):
        F.load_dictionaries(tmp_path / "m.pt")
