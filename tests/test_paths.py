"""Ingress weights through blocks (``circuits.paths``) against hand-composed weights."""
import pytest
import torch
from timm.models._efficientnet_blocks import InvertedResidual, SqueezeExcite
from timm.models.resnet import BasicBlock
from torch import nn

from circuitlab import HookedModel
from circuitlab.circuits import paths as P
from circuitlab.circuits import read_circuit


def _l1(conv):
    return conv.weight.detach().abs().flatten(2).sum(-1)


def _bn(bn):
    return bn.weight.detach().abs() / (bn.running_var + bn.eps).sqrt()


def _randomise_bn(module, g):
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.randn(m.num_features, generator=g)    # signs must not cancel
            m.running_var = torch.rand(m.num_features, generator=g) + 0.5


def test_inverted_residual_with_skip_by_hand():
    g = torch.Generator().manual_seed(0)
    ir = InvertedResidual(8, 8, exp_ratio=3.0).eval()
    _randomise_bn(ir, g)
    w, single = P.path_weight(nn.Sequential(ir), ["0"], 8)
    dw = ir.conv_dw.weight.detach().abs().flatten(1).sum(1)          # depthwise: a diagonal
    want = (_bn(ir.bn3)[:, None] * _l1(ir.conv_pwl)) @ torch.diag(_bn(ir.bn2) * dw) @ \
        (_bn(ir.bn1)[:, None] * _l1(ir.conv_pw)) + torch.eye(8)
    assert single is None
    assert torch.allclose(w, want, rtol=1e-5)


def test_basic_block_with_downsample_by_hand():
    g = torch.Generator().manual_seed(1)
    ds = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))
    bb = BasicBlock(4, 8, stride=2, downsample=ds).eval()
    _randomise_bn(bb, g)
    w, _ = P.path_weight(nn.Sequential(bb), ["0"], 4)
    want = (_bn(bb.bn2)[:, None] * _l1(bb.conv2)) @ (_bn(bb.bn1)[:, None] * _l1(bb.conv1)) + \
        _bn(ds[1])[:, None] * _l1(ds[0])
    assert torch.allclose(w, want, rtol=1e-5)


def test_gates_and_unknown_modules_do_not_compose():
    se = InvertedResidual(8, 8, exp_ratio=3.0, se_layer=SqueezeExcite)
    assert P.path_weight(nn.Sequential(se), ["0"], 8) is None
    attn = nn.Sequential(nn.MultiheadAttention(8, 2))
    assert P.path_weight(attn, ["0"], 8) is None


class Net(nn.Module):
    """stem -> Sequential of two inverted residuals -> conv c; a skip from the stem around
    ``c`` into the pooled features."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(InvertedResidual(8, 8, exp_ratio=2.0),
                                    InvertedResidual(8, 6, exp_ratio=2.0))
        self.c = nn.Sequential(nn.Conv2d(6, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        s = self.stem(x)
        return self.fc(self.pool(self.c(self.blocks(s)) + s).flatten(1))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = Net().eval()
    _randomise_bn(model, torch.Generator().manual_seed(2))
    return HookedModel(model, data_config={"input_size": (3, 8, 8)}), torch.randn(1, 3, 8, 8)


def test_module_chain_climbs_and_descends():
    m = Net()
    assert P.module_chain(m, "stem", "blocks.1") == ["blocks.0", "blocks.1"]
    assert P.module_chain(m, "blocks.0", "c.0") == ["blocks.1", "c.0"]
    assert P.module_chain(m, "blocks.1", None, stop_before="fc") == ["c", "pool"]
    assert P.module_chain(m, "blocks", "blocks.0") is None
    assert P.module_chain(m, "c.0", "c") == ["c.1", "c.2"]


def test_readout_edge_kinds_and_path_scores(net):
    hm, x = net
    c = read_circuit(hm, x, layers=["stem", "blocks.1", "c.0", "c"], select_by="energy", k=3)
    kinds = c.edges.groupby(["src_layer", "dst_layer"])["kind"].first().to_dict()
    assert kinds[("stem", "blocks.1")] == "path"
    assert kinds[("blocks.1", "c.0")] == "weight"          # one conv: the paper's raw ||W||
    assert kinds[("c.0", "c")] == "path"                    # BatchNorm alone: a diagonal
    # the pooled features read c plus the stem's skip: not a chain, so effective edges
    assert kinds[("c", "hook_pooled")] == "effective"
    w, _ = P.path_weight(hm.model, ["blocks.0", "blocks.1"], 8)
    energy = hm.model.stem(x)[0].flatten(1).norm(dim=1)
    for r in c.edges[c.edges["kind"] == "path"].head(6).itertuples():
        if r.src_layer == "stem":
            assert r.score == pytest.approx(w[r.dst_unit, r.src_unit].item() *
                                            energy[r.src_unit].item(), rel=1e-5)
    e = c.edges[c.edges["kind"] == "weight"].iloc[0]
    assert e.weight_l1 == pytest.approx(_l1(hm.model.c[0])[e.dst_unit, e.src_unit].item(),
                                        rel=1e-5)


def test_verify_rejects_a_chain_the_run_does_not_follow(net):
    hm, x = net
    chain = ["pool"]
    _, cache = hm.run_with_cache(x, names=["c", "hook_pooled"] + P.chain_hooks(chain))
    assert not P.verify(cache, "c", chain, "hook_pooled")      # pool reads c + stem
    chain = ["blocks.1", "c"]
    _, cache = hm.run_with_cache(x, names=["blocks.0", "c"] + P.chain_hooks(chain))
    assert P.verify(cache, "blocks.0", chain, "c")
