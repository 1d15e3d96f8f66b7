"""Certified minimality: pruning regions against a model whose answer is known by hand, and
the certificate's claim re-checked by direct deletions on the trained synthetic CNN."""
import torch
from scipy import ndimage
from torch import nn

from circuitlab import HookedModel
from circuitlab.explain import explain
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
