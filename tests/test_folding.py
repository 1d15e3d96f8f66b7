"""BatchNorm folded into the convolution that feeds it (``folding``, ``Execution(
fold_batchnorm=True)``): the copy's logits against the model's own, the pairs it must not
fold, and what a folding reader reads and refuses."""
import copy

import pytest
import torch
from timm.layers import BatchNormAct2d
from torch import nn

import circuitlab
from circuitlab import CircuitlabError
from circuitlab.execution import Execution
from circuitlab.folding import fold_batchnorm
from helpers import batch_for, get_model

NORMS = (nn.BatchNorm2d, BatchNormAct2d)


def _with_random_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy whose norms are no identity (freshly built ones are: mean 0, variance 1)."""
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.2)
    return model


def test_every_family_keeps_its_logits_and_cnns_lose_their_norms(family_model):
    key, hm = family_model
    model = _with_random_statistics(hm.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = batch_for(hm, b=3)
    folded, pairs = fold_batchnorm(model, x[:1])
    norms = [p for p, m in model.named_modules() if type(m) in NORMS]
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(folded(x), want, rtol=1e-4,
                                   atol=1e-4 * float(want.abs().max()))
    if not norms:                                    # ViTs, ConvNeXt (LayerNorm), VGG
        assert folded is model and pairs == []
        return
    # every norm of these CNNs sits right after a convolution
    assert sorted(n for _, n in pairs) == sorted(norms), key
    assert not any(type(m) in NORMS for m in folded.modules())
    # the model itself is as it was
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [p for p, m in model.named_modules() if type(m) in NORMS] == norms


class _Shared(nn.Module):
    """The convolution's output goes to the norm and around it: folding would change the
    path around it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        h = self.conv(x)
        return self.head((self.bn(h) + h).mean((2, 3)))


class _Twice(nn.Module):
    """One norm run on two convolutions' outputs."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return (self.bn(self.a(x)) + self.bn(self.b(x))).mean((1, 2, 3))[:, None]


@pytest.mark.parametrize("build", [_Shared, _Twice])
def test_a_pair_that_folding_would_change_is_left_alone(build):
    model = _with_random_statistics(build().eval())
    x = torch.randn(2, 3, 8, 8)
    folded, pairs = fold_batchnorm(model, x[:1])
    assert folded is model and pairs == []


def test_a_norm_in_training_mode_is_left_alone():
    model = _with_random_statistics(get_model("tv_resnet18").model)
    model.layer1[0].bn1.train()
    _, pairs = fold_batchnorm(model, torch.randn(1, 3, 64, 64))
    assert ("layer1.0.conv1", "layer1.0.bn1") not in pairs
    assert ("layer1.0.conv2", "layer1.0.bn2") in pairs


def test_a_folding_reader_reads_the_models_values_and_refuses_points_inside_a_pair():
    hm = circuitlab.load_model("efficientnet_lite0")       # real ImageNet statistics
    x = circuitlab.data.load_image("chelsea", hm)
    names = list(hm.taps) + ["bn1", "blocks.1.0.bn1.act"]
    before = {k: v.clone() for k, v in hm.model.state_dict().items()}
    read = hm.reader(names, Execution(fold_batchnorm=True, channels_last=True))
    assert len(read.folded) == 49
    logits, acts = read(x)
    ref_logits, cache = hm.run_with_cache(x, names=names)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    for n, a in zip(names, acts):
        scale = float(cache[n].abs().max())
        torch.testing.assert_close(a, cache[n], rtol=1e-4, atol=1e-4 * scale, msg=n)
    # the user's model: its weights, layout and modules as they were, no hook left
    for k, v in hm.model.state_dict().items():
        assert torch.equal(before[k], v) and v.is_contiguous(), k
    assert isinstance(hm.model.bn1, BatchNormAct2d)
    assert not any(m._forward_hooks for m in hm.model.modules())
    for inside in ("conv_stem", "bn1.hook_in", "blocks.1.0.conv_pw"):
        with pytest.raises(CircuitlabError, match="folded"):
            hm.reader([inside], Execution(fold_batchnorm=True))
