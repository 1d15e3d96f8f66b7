"""Batched ablation and patching against one-variant-at-a-time hand-written torch hooks."""
import pytest
import torch

from circuitlab import CircuitlabError
from helpers import batch_for


def _forward_with(hm, x, module, fn, pre=False):
    mod = hm.model.get_submodule(module)
    if pre:
        h = mod.register_forward_pre_hook(lambda m, args: (fn(args[0]),) + tuple(args[1:]))
    else:
        h = mod.register_forward_hook(lambda m, a, o: fn(o))
    try:
        with torch.no_grad():
            return hm.model(x)
    finally:
        h.remove()


def _zero_channel(c):
    def fn(o):
        o = o.clone()
        o[:, c] = 0
        return o
    return fn


def test_zero_ablation_each_channel_equals_hand_written(small_resnet):
    hm = small_resnet
    x = batch_for(hm)
    units = [0, 5, 17, 63]
    out = hm.ablate(x, hm.each_unit("layer1", units), ablation="zero", batch_size=4)
    assert out.shape == (4, 2, hm.model.num_classes)
    for i, c in enumerate(units):
        ref = _forward_with(hm, x, "layer1", _zero_channel(c))
        torch.testing.assert_close(out[i], ref, rtol=1e-5, atol=1e-5)
    # chunking does not change results
    torch.testing.assert_close(out, hm.ablate(x, hm.each_unit("layer1", units), batch_size=64),
                               rtol=1e-5, atol=1e-5)


def test_mean_ablation_keep_only_circuit(small_resnet):
    hm = small_resnet
    x, ref_imgs = batch_for(hm, 1), batch_for(hm, 5, seed=1)
    keep = [1, 2, 3, 40]
    out = hm.ablate(x, {"layer3": keep, "layer2": slice(0, 10)}, ablation="mean",
                    reference=ref_imgs, keep=True)
    with torch.no_grad():
        _, cache = hm.run_with_cache(ref_imgs, names=["layer2", "layer3"])
    means = {n: cache[n].mean(0, keepdim=True) for n in ("layer2", "layer3")}
    kept = {"layer3": torch.zeros(256, dtype=torch.bool), "layer2": torch.zeros(128, dtype=torch.bool)}
    kept["layer3"][keep] = True
    kept["layer2"][:10] = True
    mods = dict(hm.model.named_modules())
    hs = [mods[n].register_forward_hook(
        lambda m, a, o, n=n: torch.where(kept[n].view(1, -1, 1, 1), o, means[n]))
        for n in ("layer2", "layer3")]
    try:
        with torch.no_grad():
            ref = hm.model(x)
    finally:
        for h in hs:
            h.remove()
    torch.testing.assert_close(out[0], ref, rtol=1e-5, atol=1e-5)


def test_patch_each_unit_equals_hand_written(small_resnet):
    hm = small_resnet
    x, src = batch_for(hm, 2), batch_for(hm, 2, seed=7)
    with torch.no_grad():
        _, sc = hm.run_with_cache(src, names="layer2")
    units = [3, 9, 100]
    out = hm.patch(x, src, hm.each_unit("layer2", units), batch_size=3)
    for i, c in enumerate(units):
        def fn(o, c=c):
            o = o.clone()
            o[:, c] = sc["layer2"][:, c]
            return o
        torch.testing.assert_close(out[i], _forward_with(hm, x, "layer2", fn), rtol=1e-5,
                                   atol=1e-5)


def test_resample_from_one_reference_is_patching(small_resnet):
    hm = small_resnet
    x, ref = batch_for(hm, 2), batch_for(hm, 1, seed=3)
    v = hm.each_unit("layer3", [0, 7])
    torch.testing.assert_close(hm.ablate(x, v, ablation="resample", reference=ref),
                               hm.patch(x, ref, v), rtol=1e-5, atol=1e-5)
    a = hm.ablate(x, v, ablation="resample", reference=batch_for(hm, 6, seed=4), seed=1)
    b = hm.ablate(x, v, ablation="resample", reference=batch_for(hm, 6, seed=4), seed=1)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # seeded


def test_vit_head_and_neuron_ablation(small_vit):
    hm = small_vit
    x = batch_for(hm)
    heads = hm.model.blocks[2].attn.num_heads
    out = hm.ablate(x, hm.each_unit("blocks.2.attn.hook_z"), ablation="zero")
    assert out.shape[0] == heads
    d = 192 // heads
    for h in range(heads):
        def fn(t, h=h):
            t = t.clone()
            t[..., h * d:(h + 1) * d] = 0
            return t
        ref = _forward_with(hm, x, "blocks.2.attn.proj", fn, pre=True)
        torch.testing.assert_close(out[h], ref, rtol=1e-5, atol=1e-5)
    neurons = [0, 100, 767]
    out = hm.ablate(x, {"blocks.1.mlp.hook_post": neurons}, ablation="zero")

    def zero_neurons(o):
        o = o.clone()
        o[..., neurons] = 0
        return o
    torch.testing.assert_close(out[0], _forward_with(hm, x, "blocks.1.mlp.act", zero_neurons),
                               rtol=1e-5, atol=1e-5)
    # attention-pattern heads (unit axis 1)
    out = hm.ablate(x, {"blocks.0.attn.hook_pattern": [1]}, ablation="zero")

    def zero_head(o):
        o = o.clone()
        o[:, 1] = 0
        return o
    attn = hm.model.blocks[0].attn
    attn.fused_attn = False
    try:
        ref = _forward_with(hm, x, "blocks.0.attn.attn_drop", zero_head)
    finally:
        attn.fused_attn = True
    torch.testing.assert_close(out[0], ref, rtol=1e-5, atol=1e-5)


def test_unit_axis_follows_channels_last_layers():
    import warnings

    from circuitlab import load_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # timm ConvNeXt with conv_mlp=False runs its MLP channels-last (B, H, W, C)
        hm = load_model("convnext_atto", pretrained=False, conv_mlp=False,
                        data_config={"input_size": (3, 64, 64)})
        p = hm.point("stages.1.blocks.0.mlp.act")
        assert p.unit_axis == 3 and p.shape[1] == p.shape[2] and p.kind == "act"
        assert hm.point("stages.1.blocks.0.conv_dw").unit_axis == 1
        assert hm.point("stages.1.blocks.0").unit_axis == 1
        # torchvision ConvNeXt permutes with a Permute module
        tv = load_model("torchvision/convnext_tiny", pretrained=False,
                        data_config={"input_size": (3, 64, 64)})
    assert tv.point("features.1.0.block.3").unit_axis == 3   # Linear after Permute
    assert tv.point("features.1.0.block.6").unit_axis == 1   # permuted back
    assert tv.point("features.1.0").unit_axis == 1


def test_bad_intervention_input(small_resnet):
    hm, x = small_resnet, batch_for(small_resnet)
    with pytest.raises(CircuitlabError, match="has 64 units"):
        hm.ablate(x, {"layer1": [64]})
    with pytest.raises(CircuitlabError, match="reference images"):
        hm.ablate(x, {"layer1": [0]}, ablation="mean")
    with pytest.raises(CircuitlabError, match="unknown ablation 'median'"):
        hm.ablate(x, {"layer1": [0]}, ablation="median")
    with pytest.raises(CircuitlabError, match="Did you mean"):
        hm.ablate(x, {"layer_1": [0]})
    with pytest.raises(CircuitlabError, match="source batch"):
        hm.patch(x, batch_for(hm, 3), {"layer1": [0]})
