"""Saliency baselines: shapes on every family, properties that pin each method down, and
cross-checks against the libraries users trust (pytorch_grad_cam, captum)."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import circuitlab
from circuitlab import baselines as B
from circuitlab.errors import CircuitlabError
from helpers import batch_for, get_model

QUICK = {"rise": {"n_masks": 64, "batch_size": 32}, "extremal": {"steps": 5},
         "ig": {"steps": 4}}


@pytest.mark.parametrize("key", ["timm_resnet18", "mobilenetv3", "tv_vgg11", "vit"])
def test_every_method_gives_a_map_at_input_size(key):
    hm = get_model(key)
    x = batch_for(hm, 2)
    assert ("rollout" in B.methods_for(hm)) == (key == "vit")
    for m in B.methods_for(hm):
        s = B.saliency(hm, x, m, **QUICK.get(m, {}))
        assert s.shape == (2, 1, *x.shape[-2:]), m
        assert torch.isfinite(s).all() and s.min() >= 0 and s.max() <= 1 + 1e-6, m


class _Region(nn.Module):
    def __init__(self):
        super().__init__()
        region = torch.zeros(1, 1, 32, 32)
        region[..., :16, :16] = 1
        self.register_buffer("region", region)

    def forward(self, a):
        return a * self.region


class _Quadrant(nn.Module):
    """Class 0's logit reads only the top-left quadrant, class 1 is a constant: every
    faithful saliency method must point there. The evidence is high-frequency (a Laplacian
    of the first channel) so blurring it away (extremal perturbations) removes it too, and
    the feature map is zero outside the quadrant so Grad-CAM's channel weights localise."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 3, padding=1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = torch.tensor([[0., -1, 0], [-1, 4, -1], [0, -1, 0]])
        self.region = _Region()

    def forward(self, x):
        a = self.region(torch.relu(self.conv(x)))
        z = a.mean((1, 2, 3)) * 32
        # class 0 wins on the image (z about 4 > 2) and p_0 sits mid-sigmoid when half of
        # the quadrant is masked: RISE's signal is not lost to saturation
        return torch.stack([z, torch.full_like(z, 2.0)], 1)


@pytest.fixture(scope="module")
def quadrant():
    hm = circuitlab.load_model(_Quadrant(), data_config={"input_size": (3, 32, 32)})
    x = torch.rand(2, 3, 32, 32) + 0.5           # positive: class 0 wins everywhere
    return hm, x


@pytest.mark.parametrize("method,kw", [("gradcam", {}), ("gradcam++", {}), ("ig", {}),
                                       ("rise", {"n_masks": 2000}),
                                       ("extremal", {"steps": 800, "area": 0.1, "jitter": False})])
def test_methods_find_the_only_evidence(quadrant, method, kw):
    # (extremal without its flip jitter: this toy, unlike an image classifier, is not
    # left-right symmetric)
    hm, x = quadrant
    s = B.saliency(hm, x, method, target=0, **kw)
    if method == "extremal":
        # the rank constraint makes the mask close to binary with about 10 % of it on
        assert abs(float((s > 0.5).float().mean()) - 0.1) < 0.05
    mask = B.binarize_at_area(s, 0.05)        # 51 pixels; the quadrant has 256
    assert mask[..., :16, :16].sum() / mask.sum() > 0.9, method


def test_integrated_gradients_completeness(small_resnet):
    hm = small_resnet
    x = batch_for(hm, 2)
    y = hm(x).argmax(1)
    attr = B.integrated_gradients(hm, x, reduce=None, steps=64)
    with torch.no_grad():
        gap = hm(x).gather(1, y[:, None])[:, 0] - hm(torch.zeros_like(x)).gather(1, y[:, None])[:, 0]
    # sum of attributions = f(x) - f(baseline), up to the Riemann error
    assert torch.allclose(attr.sum((1, 2, 3)), gap, rtol=0.05, atol=0.05)


def test_rollout_of_one_block_is_the_cls_attention():
    hm = circuitlab.load_model("deit_tiny_patch16_224", pretrained=False, img_size=32,
                               patch_size=8, depth=1, data_config={"input_size": (3, 32, 32)})
    x = batch_for(hm, 2)
    # one block: rollout = 0.5 A + 0.5 I, whose class row over the patches is 0.5 A_cls
    r = B.attention_rollout(hm, x)
    c = B.cls_attention(hm, x)
    assert torch.allclose(r, c, atol=1e-5)


def test_rollout_by_hand(small_vit):
    hm = small_vit
    x = batch_for(hm, 1)
    _, cache = hm.run_with_cache(x, names="*.attn.hook_pattern")
    roll = torch.eye(cache[hm.hook_names("*.attn.hook_pattern")[0]].shape[-1])
    for n in hm.hook_names("*.attn.hook_pattern"):
        a = 0.5 * cache[n][0].mean(0) + 0.5 * torch.eye(roll.shape[0])
        roll = (a / a.sum(-1, keepdim=True)) @ roll
    side = int((roll.shape[0] - 1) ** 0.5)
    want = roll[0, 1:].reshape(1, 1, side, side)
    want = torch.nn.functional.interpolate(want, size=x.shape[-2:], mode="bilinear")
    want = (want - want.min()) / (want.max() - want.min())
    assert torch.allclose(B.attention_rollout(hm, x), want, atol=1e-5)


def test_bad_input_says_what_to_do(small_resnet):
    hm = small_resnet
    x = batch_for(hm, 1)
    with pytest.raises(CircuitlabError, match="unknown saliency method"):
        B.saliency(hm, x, "lime")
    with pytest.raises(CircuitlabError, match="use gradcam"):
        B.saliency(hm, x, "rollout")
    with pytest.raises(CircuitlabError, match="it takes"):
        B.saliency(hm, x, "rise", n_mask=3)
    with pytest.raises(CircuitlabError, match="area must lie"):
        B.extremal_perturbation(hm, x, area=5)
    with pytest.raises(CircuitlabError, match="unknown layer"):
        B.grad_cam(hm, x, layer="layer9")
    with pytest.raises(CircuitlabError, match="NaN"):
        B.grad_cam(hm, x * float("nan"))


# --------------------------------------------------------------------- cross-checks
def _corr(a, b):
    return float(np.corrcoef(np.asarray(a).ravel(), np.asarray(b).ravel())[0, 1])


def _vit_tokens_to_map(t):
    side = int((t.shape[1] - 1) ** 0.5)
    return t[:, 1:].reshape(t.shape[0], side, side, t.shape[2]).permute(0, 3, 1, 2)


@pytest.mark.parametrize("key,ours,theirs", [
    ("timm_resnet18", "gradcam", "GradCAM"), ("timm_resnet18", "gradcam++", "GradCAMPlusPlus"),
    ("efficientnet_lite0", "gradcam", "GradCAM"), ("vit", "gradcam", "GradCAM")])
def test_grad_cam_matches_pytorch_grad_cam(key, ours, theirs):
    gc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    hm = get_model(key)
    x = circuitlab.data.load_image("coffee", hm) if key == "efficientnet_lite0" else \
        batch_for(hm, 2, seed=3)
    layer = B.default_layer(hm)
    s = B.saliency(hm, x, ours, layer=layer)[:, 0]
    model = copy.deepcopy(hm.model).requires_grad_(True)  # the package needs weight grads
    with getattr(gc, theirs)(model=model, target_layers=[model.get_submodule(layer)],
                             reshape_transform=_vit_tokens_to_map if key == "vit" else None
                             ) as cam:
        targets = [ClassifierOutputTarget(int(c)) for c in hm(x).argmax(1)]
        r = cam(input_tensor=x, targets=targets)
    for i in range(x.shape[0]):
        assert _corr(s[i], r[i]) >= 0.99, (key, ours, i)


def test_integrated_gradients_matches_captum(small_resnet):
    captum = pytest.importorskip("captum.attr")
    hm = small_resnet
    x = batch_for(hm, 2, seed=4)
    y = hm(x).argmax(1)
    want = captum.IntegratedGradients(hm.model).attribute(
        x, baselines=torch.zeros_like(x), target=y, n_steps=16, method="riemann_trapezoid")
    got = B.integrated_gradients(hm, x, reduce=None, steps=16)
    for i in range(2):
        assert _corr(got[i], want[i].detach()) >= 0.99


def test_extremal_masks_leave_their_all_ones_start_at_224_px():
    # the smoothed all-ones mask exceeds 1 by rounding; a plain clamp there has no gradient
    # and kept every Lite0 mask at 1 everywhere (a flat map, binarised as the top rows)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    hm = circuitlab.load_model(model, data_config={"input_size": (3, 224, 224)})
    m = B.extremal_perturbation(hm, torch.randn(1, 3, 224, 224), area=0.1, steps=20)
    assert float(m.min()) < 0.99
