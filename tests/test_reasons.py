"""Every sufficient reason: disjoint masks, each keeping the label alone, checked by direct
forwards; on the benchmark's two-object variant both planted objects must be found."""
import pytest
import torch

from circuitlab import synthetic
from circuitlab.errors import CircuitlabError
from circuitlab.explain.reasons import all_reasons


def _check(hm, x, reasons, target):
    union = torch.zeros_like(x[:, :1]).cpu()
    for r in reasons:
        with torch.no_grad():
            p = hm(r.mask.to(x.device) * x).softmax(-1)[0]
        assert int(p.argmax()) == target                      # sufficient on its own
        assert float(p[target]) == pytest.approx(r.confidence, abs=1e-5)
        assert float((union * r.mask).sum()) == 0             # disjoint from the others
        union += r.mask
    assert [r.confidence for r in reasons] == sorted((r.confidence for r in reasons),
                                                     reverse=True)


@pytest.mark.slow
def test_both_planted_objects_are_found_as_separate_reasons(cnn):
    hm = cnn[0]
    d = synthetic.make_dataset(4, seed=321, decisive=2)
    x = d.normalized()
    found = all_reasons(hm, x, k=3)
    both = 0
    for i, reasons in enumerate(found):
        target = int(hm(x[i:i + 1]).argmax())
        _check(hm, x[i:i + 1], reasons, target)
        # which planted object each reason covers most of
        on = [int(torch.argmax(torch.stack([(r.mask[0, 0] * p).sum() / p.sum()
                                             for p in d.parts[i]]))) for r in reasons]
        both += {0, 1} <= set(on)
    assert both >= 3, f"both objects found on {both} of 4 images"


def test_k_is_checked(cnn):
    with pytest.raises(CircuitlabError, match="at least 1"):
        all_reasons(cnn[0], cnn[1], k=0)
