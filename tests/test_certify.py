"""Certified minimality: pruning regions against a model whose answer is known by hand, and
the certificate's claim re-checked by direct deletions on the trained synthetic CNN."""
import pytest
import torch
from scipy import ndimage
from torch import nn

from circuitlab import CircuitlabError, HookedModel
from circuitlab.explain import explain, minimize, preset
from circuitlab.explain.certify import certify
from circuitlab.metrics import STRUCTURE_8


class _Brightness(nn.Module):
    """Class 1 when the mean of input channel 0 exceeds 4 / 64 (logit difference linear in it)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 1, 1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1, 2)
        with torch.no_grad():
            self.a.weight.zero_()
            self.a.weight[0, 0] = 1.0
            self.fc.weight.copy_(torch.tensor([[0.0], [64.0]]))
            self.fc.bias.copy_(torch.tensor([3.5, 0.0]))

    def forward(self, x):
        return self.fc(self.pool(self.a(x)).flatten(1))


def test_pruning_keeps_exactly_the_regions_the_label_needs():
    hm = HookedModel(_Brightness(), data_config={"input_size": (3, 8, 8)})
    # three one-pixel regions of evidence 3, 2 and 1: any two holding >= 4 keep class 1.
    # Deleting C (1) leaves the surest prediction, so it goes; then A and B are each needed.
    x = torch.zeros(1, 3, 8, 8)
    where = {"A": (1, 1), "B": (1, 6), "C": (6, 3)}
    for (r, c), v in zip(where.values(), (3.0, 2.0, 1.0)):
        x[0, 0, r, c] = v
    mask = torch.zeros(1, 1, 8, 8)
    mask[0, 0, :3, :3] = 1          # region A with empty pixels around it
    mask[0, 0, 1, 5:7] = 1          # region B
    mask[0, 0, 5:8, 3] = 1          # region C
    cert = certify(hm, x, mask)[0]
    expect = torch.zeros_like(mask)
    expect[0, 0, :3, :3] = 1
    expect[0, 0, 1, 5:7] = 1
    assert torch.equal(cert.mask, expect)
    assert cert.pruned == 1 and cert.kept and cert.locally_minimal
    assert cert.regions["necessary"].all() and sorted(cert.regions["pixels"]) == [2, 9]


def _three_regions():
    """Evidence 3, 2 and 1 in regions A, B, C: p(class 1) = sigmoid(kept evidence - 3.5)."""
    hm = HookedModel(_Brightness(), data_config={"input_size": (3, 8, 8)})
    x = torch.zeros(1, 3, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    for (r, c), v in zip(((1, 1), (1, 6), (6, 3)), (3.0, 2.0, 1.0)):
        x[0, 0, r, c] = v
        mask[0, 0, r, c] = 1
    return hm, x, mask


def test_a_confidence_floor_keeps_the_regions_the_confidence_needs():
    hm, x, mask = _three_regions()
    p = torch.sigmoid(torch.tensor([2.5, 1.5]))   # all three regions; without C
    # without a floor C goes (the label survives it); with a floor between the two it stays
    assert certify(hm, x, mask)[0].mask.sum() == 2
    cert = certify(hm, x, mask, floor=torch.tensor([float(p.mean())]))[0]
    assert torch.equal(cert.mask, mask) and cert.pruned == 0 and cert.locally_minimal
    assert cert.regions["necessary"].all()
    # a floor the mask itself does not reach: not kept, nothing certified
    cert = certify(hm, x, mask, floor=torch.tensor([float(p[0]) + 0.01]))[0]
    assert not cert.kept and not cert.locally_minimal and cert.pruned == 0


def test_a_mask_that_loses_the_label_is_not_certified():
    hm = HookedModel(_Brightness(), data_config={"input_size": (3, 8, 8)})
    x = torch.zeros(1, 3, 8, 8)
    x[0, 0, 2, 2] = 5.0
    mask = torch.zeros(1, 1, 8, 8)
    mask[0, 0, 6, 6] = 1            # misses the evidence
    cert = certify(hm, x, mask, target=torch.tensor([1]))[0]
    assert not cert.kept and not cert.locally_minimal and cert.pruned == 0


def test_every_certified_region_is_necessary_on_a_trained_model(cnn):
    hm, x, _ = cnn
    ex = explain(hm, x, steps=40)
    cert = certify(hm, x, ex.mask)[0]
    assert cert.kept and (cert.mask <= (ex.mask.cpu() > 0.5).float()).all()
    # the claim, re-checked without the certifier: each region deleted alone loses top-1
    labels, n = ndimage.label(cert.mask[0, 0].numpy() > 0.5, structure=STRUCTURE_8)
    assert n == len(cert.regions) >= 1
    target = int(hm(x).argmax())
    with torch.no_grad():
        lost = [int(hm(cert.mask * torch.from_numpy(labels != k).float() * x).argmax())
                != target for k in range(1, n + 1)]
    assert cert.locally_minimal == all(lost)
    assert cert.locally_minimal


def test_regions_that_can_go_together_go_in_one_round():
    hm = HookedModel(_Brightness(), data_config={"input_size": (3, 8, 8)})
    x = torch.zeros(1, 3, 8, 8)
    x[0, 0, 0, 0] = 5.0                         # A alone holds the class
    mask = torch.zeros(1, 1, 8, 8)
    mask[0, 0, 0, 0] = 1
    for c in (3, 5, 7):                         # three empty regions, each removable
        mask[0, 0, 6, c] = 1
    calls = []
    forward = hm.model.forward
    hm.model.forward = lambda t: (calls.append(t.shape[0]), forward(t))[1]
    cert = certify(hm, x, mask)[0]
    assert cert.pruned == 3 and cert.locally_minimal and cert.mask.sum() == 1
    # the target and the mask's check (1, 1); one round: each region alone (4), then the
    # bisection over the three removable ones' prefixes (2 and 3 regions: 1, 1); then the
    # region left, alone (1)
    assert calls == [1, 1, 4, 1, 1, 1]


def test_the_area_search_halves_while_the_decision_holds_and_certifies_at_its_floor(cnn):
    hm, x, _ = cnn
    free = explain(hm, x, steps=40)
    ex = minimize(hm, x, free, steps=20)
    trail = ex.search[0]
    assert trail, "the search tried no budget"
    # budgets halve from the free mask's area (to the 32-cell grid's rounding); every accepted
    # one was; the first refusal (if any) ends the search
    area = float(free.area[0])
    for probe in trail:
        area /= 2
        assert abs(probe["area"] - area) <= 1 / 1024 + 1e-6
    accepted = [p["accepted"] for p in trail]
    assert accepted == sorted(accepted, reverse=True) and accepted.count(False) <= 1
    assert all(p["accepted"] == (p["kept"] and p["confidence_ratio"] >= 1) for p in trail)
    # the certificate's claim, re-checked by hand at the floor: the image's p_target when a
    # budget was accepted
    target = int(hm(x).argmax())
    with torch.no_grad():
        p_image = float(hm(x).softmax(-1)[0, target])
        p_mask = float(hm(ex.mask * x).softmax(-1)[0, target])
    cert = ex.certificates[0]
    assert cert.kept and ex.mask.sum() <= free.mask.sum()
    if any(accepted):
        assert p_mask >= p_image
        labels, n = ndimage.label(ex.mask[0, 0].cpu().numpy() > 0.5, structure=STRUCTURE_8)
        for k in range(1, n + 1):
            keep = torch.from_numpy(labels != k).float()
            with torch.no_grad():
                out = hm(ex.mask * keep * x).softmax(-1)[0]
            held = int(out.argmax()) == target and float(out[target]) >= p_image
            assert held != bool(cert.regions.set_index("region").loc[k, "necessary"])
    # the label alone admits every budget the confidence floor did, and perhaps more
    loose = minimize(hm, x, free, steps=20, confidence=0.0).search[0]
    assert len(loose) >= sum(accepted)
    assert [p["area"] for p in loose[:sum(accepted)]] == [p["area"] for p in trail if
                                                          p["accepted"]]


def test_minimal_refuses_an_area_budget(cnn):
    hm, x, _ = cnn
    cfg = preset("default", hm.family.name, x.shape[-1], area_budget=0.1)
    with pytest.raises(CircuitlabError, match="minimal=True searches the area"):
        explain(hm, x, cfg, minimal=True)
