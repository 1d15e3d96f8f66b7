"""The region search's scorer (``explain.pieces.Scorer``): each set scored once, and the best
set of a round found with fewer forwards but exactly as scoring every set under every fill
would (the independent oracle: a fresh scorer's full scores)."""
import random
from dataclasses import replace

import pytest
import torch

import circuitlab
from circuitlab.explain import RegionSearch
from circuitlab.explain.pieces import Scorer, holding, superpixels


@pytest.fixture(scope="module")
def image():
    hm = circuitlab.load_model("synthetic-cnn")
    x = circuitlab.synthetic.make_dataset(1, seed=5).normalized()
    search = RegionSearch(segments=24, batch_size=2)
    return hm, x, search, superpixels(hm, x, search)


def _counting(score):
    """The scorer with the images of each forward (by any of its workers) counted."""
    images = []

    def counted(read):
        return lambda batch: (images.append(batch.shape[0]), read(batch))[1]

    score.reads[:] = [counted(r) for r in score.reads]
    return images


def test_a_set_is_scored_once(image):
    """The scorer keeps what it scored: sets asked again (here, or by the scorer of another
    score it makes for a later stage) cost no forward, and give the same numbers."""
    hm, x, search, labels = image
    score = Scorer(hm, x, labels, 0, search, seed=1, by="logp")
    images = _counting(score)
    first = score([{0}, {1, 2}, {0}, {3}])
    assert sum(images) == 3 * len(search.fills)            # {0} once
    again = score.scoring("margin")
    second = again([{2, 1}, {0}])
    assert sum(images) == 3 * len(search.fills)            # nothing new
    assert torch.equal(second[0], first[0][[1, 0]])
    fresh = Scorer(hm, x, labels, 0, search, seed=1, by="margin")([{1, 2}, {0}])
    assert torch.equal(second[2], fresh[2]) and torch.equal(second[1], fresh[1])



@pytest.mark.parametrize("by", ["logp", "margin"])
def test_the_best_set_is_the_one_every_score_picks_for_fewer_forwards(image, by):
    """``best``: the first set of the highest score (of those that hold at a floor, when one
    is given), with its log p, top-1 kept and score, as a fresh scorer scoring every set
    under every fill gives them; None where none holds."""
    hm, x, search, labels = image
    n = int(labels.max()) + 1
    target = int(hm(x).argmax(-1))
    rng = random.Random(0)
    rounds = [[set(rng.sample(range(n), rng.randint(1, n // 2))) for _ in range(12)]
              for _ in range(6)]
    rounds.append(rounds[0][:3] * 2)                     # ties: the first of them
    score = Scorer(hm, x, labels, target, search, seed=1, by=by)
    images = _counting(score)
    asked = 0
    for sets in rounds:
        for floor in (None, 0.0, 0.5, 1.1):
            oracle = Scorer(hm, x, labels, target, search, seed=1, by=by)
            logp, kept, value = oracle(sets)
            ok = holding(logp, kept, floor) if floor is not None else \
                torch.ones(len(sets), dtype=torch.bool)
            found = score.best(sets, floor)
            if not ok.any():
                assert found is None
                continue
            want = int(torch.argmax(torch.where(ok, value, -float("inf"))))
            i, lp, kp, v = found
            assert i == want
            # equal up to the rounding of other batch compositions
            torch.testing.assert_close(lp, logp[want], rtol=1e-5, atol=1e-5)
            assert torch.equal(kp, kept[want]) and v == pytest.approx(float(value[want]),
                                                                      abs=1e-5)
        asked += len({frozenset(s) for s in sets})
    # the lead fill for every set, the other fill for far fewer than all
    assert len(search.fills) * asked > sum(images) >= asked


def test_the_best_bound_is_scored_alone_first(image):
    """``best`` scores the other fills for the set of the best bound first, alone: where that
    set's score is its bound and no other bound reaches it, one forward beyond the lead
    fill's is all a round costs (a batch of sets would cost one forward each)."""
    hm, x, search, labels = image
    n = int(labels.max()) + 1
    target = int(hm(x).argmax(-1))
    rng = random.Random(3)
    seen = 0
    for _ in range(12):
        sets = [set(rng.sample(range(n), rng.randint(1, n // 2))) for _ in range(10)]
        oracle = Scorer(hm, x, labels, target, search, seed=1, by="logp")
        logp, _, value = oracle(sets)
        lead = logp[:, -1]                       # a fresh scorer's lead: the last fill
        first, second = torch.topk(lead, 2).indices.tolist()
        if not (value[first] == lead[first] and lead[second] < lead[first]):
            continue
        seen += 1
        score = Scorer(hm, x, labels, target, search, seed=1, by="logp")
        images = _counting(score)
        assert score.best(sets)[0] == first
        assert sum(images) == len({frozenset(s) for s in sets}) + 1
    assert seen       # the case happened (else the test says nothing)


def test_the_ranking_of_the_sets_that_hold_is_every_scores(image):
    """``rank``: the sets that hold at the floor, highest score first, with their log p, as
    a fresh scorer scoring every set under every fill ranks them."""
    hm, x, search, labels = image
    n = int(labels.max()) + 1
    target = int(hm(x).argmax(-1))
    rng = random.Random(1)
    score = Scorer(hm, x, labels, target, search, seed=1, by="margin")
    sizes = []
    for floor in (0.0, 0.3, 0.9):
        sets = [set(rng.sample(range(n), rng.randint(1, n - 1))) for _ in range(16)]
        logp, kept, value = Scorer(hm, x, labels, target, search, seed=1, by="margin")(sets)
        ok = holding(logp, kept, floor)
        want = [i for i in torch.argsort(-value, stable=True).tolist() if ok[i]]
        ranked, lp = score.rank(sets, floor)
        assert ranked == want
        sizes.append(len(want))
        if want:
            torch.testing.assert_close(lp, logp[want], rtol=1e-5, atol=1e-5)
        else:
            assert lp is None
    assert max(sizes) > 1 and min(sizes) < 16, sizes      # some hold, some do not


@pytest.mark.parametrize("act", [0.0, 0.5])      # with taps read by each worker's hooks
def test_forwards_run_at_once_give_what_one_at_a_time_gives(image, act):
    """``workers``: the sets' chunks scored by several single-threaded forwards at once, each
    worker on its own copy of the model, give the scores one worker gives (up to the
    rounding of another thread count), and torch's thread count is put back."""
    hm, x, search, labels = image
    n = int(labels.max()) + 1
    rng = random.Random(2)
    sets = [set(rng.sample(range(n), rng.randint(1, n - 1))) for _ in range(11)]
    threads = torch.get_num_threads()
    one = Scorer(hm, x, labels, 0, replace(search, workers=1, act=act), seed=1, by="margin")
    three = Scorer(hm, x, labels, 0, replace(search, workers=3, act=act), seed=1, by="margin")
    assert len(three.reads) == 3 and len(one.reads) == 1
    assert len({id(r.model) for r in three.reads}) == 3            # no model shared
    for a, b in zip(one(sets), three(sets)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert torch.get_num_threads() == threads
    with pytest.raises(circuitlab.CircuitlabError, match="workers"):
        RegionSearch(workers=0)
