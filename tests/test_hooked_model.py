"""run_with_cache / run_with_hooks against plain torch forward hooks and autograd, every family."""
import random

import pytest
import torch

from circuitlab import CircuitlabError
from helpers import batch_for, get_model


def _names_to_check(hm, k=6):
    """The family's taps, the classifier aliases, and a few random module outputs."""
    rng = random.Random(0)
    plain = [p.name for p in hm.hook_points.values()
             if p.io == "output" and p.call == 0 and p.alias_of is None]
    names = list(hm.taps) + ["hook_pooled", "hook_logits"] + rng.sample(plain, k)
    return list(dict.fromkeys(names))


def _torch_reference(hm, x, names, grads=False):
    """Plain forward hooks on the same modules (first call), plus autograd for gradients."""
    points = [hm.point(n) for n in names]
    modules = dict(hm.model.named_modules())
    store = {}
    handles = []
    for p in points:
        def hook(mod, args, out, p=p):
            t = args[0] if p.io == "input" else out
            if grads and t.requires_grad:
                t.retain_grad()
            store.setdefault(p.name, t)
        if p.io == "input":
            handles.append(modules[p.module].register_forward_pre_hook(
                lambda mod, args, h=hook: h(mod, args, None)))
        else:
            handles.append(modules[p.module].register_forward_hook(hook))
    try:
        x = x.clone().requires_grad_(grads)
        with torch.set_grad_enabled(grads):
            logits = hm.model(x)
            if grads:
                logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()
    finally:
        for h in handles:
            h.remove()
    return logits, store


def test_cache_equals_torch_hooks(family_model):
    key, hm = family_model
    x = batch_for(hm)
    names = _names_to_check(hm)
    logits, cache = hm.run_with_cache(x, names=names)
    ref_logits, ref = _torch_reference(hm, x, names)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    assert list(cache) == [p.name for p in hm.resolve(names)]
    for n in names:
        torch.testing.assert_close(cache[n], ref[n], rtol=0, atol=0, msg=f"{key}: {n}")


def test_cache_grads_equal_autograd(family_model):
    key, hm = family_model
    x = batch_for(hm)
    names = [n for n in _names_to_check(hm, k=3) if n != "hook_logits"]
    logits, cache = hm.run_with_cache(x, names=names, grads=True)
    _, ref = _torch_reference(hm, x, names, grads=True)
    assert torch.equal(cache.target, logits.argmax(-1))
    checked = 0
    for n in names:
        if ref[n].grad is None:  # an input never reached by the gradient
            continue
        torch.testing.assert_close(cache.grad(n), ref[n].grad, rtol=1e-5, atol=1e-6,
                                   msg=f"{key}: {n}")
        # (inner residual branches may be dead: timm zero-inits each block's last BN gamma)
        if n in hm.taps:
            assert cache.grad(n).abs().sum() > 0, f"{key}: {n} has an all-zero gradient"
        checked += 1
    assert checked >= len(hm.taps)


def test_grads_for_explicit_and_callable_targets(small_resnet):
    hm, x = small_resnet, batch_for(small_resnet)
    _, c3 = hm.run_with_cache(x, names="layer3", grads=True, target=3)
    _, cf = hm.run_with_cache(x, names="layer3", grads=True,
                              target=lambda lg: lg[:, 3].sum())
    torch.testing.assert_close(c3.grad("layer3"), cf.grad("layer3"))
    assert c3.target.tolist() == [3, 3]
    _, cv = hm.run_with_cache(x, names="layer3", grads=True, target=torch.tensor([3, 5]))
    torch.testing.assert_close(cv.grad("layer3")[0], c3.grad("layer3")[0])
    assert not torch.allclose(cv.grad("layer3")[1], c3.grad("layer3")[1])
    with pytest.raises(CircuitlabError, match="lie in"):
        hm.run_with_cache(x, names="layer3", grads=True, target=5000)


def test_names_by_glob_and_predicate(small_resnet):
    hm = small_resnet
    assert hm.hook_names("layer1.*.conv?") == ["layer1.0.conv1", "layer1.0.conv2",
                                               "layer1.1.conv1", "layer1.1.conv2"]
    assert hm.hook_names(lambda n: n.endswith("bn2") and n.startswith("layer4")) == [
        "layer4.0.bn2", "layer4.1.bn2"]
    _, cache = hm.run_with_cache(batch_for(hm), names="layer[34]")
    assert list(cache) == ["layer3", "layer4"]


def test_unknown_hook_name_suggests(small_resnet):
    with pytest.raises(CircuitlabError, match="Did you mean 'layer3'"):
        small_resnet.run_with_cache(batch_for(small_resnet), names=["layr3"])
    with pytest.raises(CircuitlabError, match="no hook point"):
        small_resnet.run_with_cache(batch_for(small_resnet), names="nothing.*")
    with pytest.raises(CircuitlabError, match="not in this cache"):
        small_resnet.run_with_cache(batch_for(small_resnet), names="layer3")[1]["layer4"]


def test_run_with_hooks_replaces_and_keeps_autograd(small_resnet):
    hm = small_resnet
    x = batch_for(hm).requires_grad_(True)
    seen = []

    def halve(a, name):
        seen.append(name)
        return a * 0.5
    logits = hm.run_with_hooks(x, fwd_hooks=[("layer2", halve), ("layer3.*.bn1", halve)])
    assert seen == ["layer2", "layer3.0.bn1", "layer3.1.bn1"]
    logits[:, 0].sum().backward()
    g_hooked = x.grad.clone()

    x2 = x.detach().clone().requires_grad_(True)
    mods = dict(hm.model.named_modules())
    hs = [mods[n].register_forward_hook(lambda m, a, o: o * 0.5)
          for n in ("layer2", "layer3.0.bn1", "layer3.1.bn1")]
    try:
        ref = hm.model(x2)
        ref[:, 0].sum().backward()
    finally:
        for h in hs:
            h.remove()
    torch.testing.assert_close(logits, ref, rtol=0, atol=0)
    torch.testing.assert_close(g_hooked, x2.grad)
    # a hook that returns None only reads
    untouched = hm.run_with_hooks(x.detach(), fwd_hooks=[("layer2", lambda a, n: None)])
    torch.testing.assert_close(untouched, hm(x.detach()), rtol=0, atol=0)


def test_later_calls_of_a_reused_module():
    hm = get_model("tv_resnet18")
    assert "layer1.0.relu@1" in hm.hook_points  # torchvision reuses one ReLU per block
    outs = []
    h = hm.model.layer1[0].relu.register_forward_hook(lambda m, a, o: outs.append(o))
    x = batch_for(hm)
    try:
        hm.model(x)
    finally:
        h.remove()
    _, cache = hm.run_with_cache(x, names=["layer1.0.relu", "layer1.0.relu@1"])
    torch.testing.assert_close(cache["layer1.0.relu"], outs[0], rtol=0, atol=0)
    torch.testing.assert_close(cache["layer1.0.relu@1"], outs[1], rtol=0, atol=0)
    # zeroing the second call zeroes the block output, which it is
    _, c = hm.run_with_cache(x, names="layer1.0")
    logits = hm.run_with_hooks(x, fwd_hooks=[("layer1.0.relu@1", lambda a, n: a * 0)])
    ref = hm.run_with_hooks(x, fwd_hooks=[("layer1.0", lambda a, n: a * 0)])
    torch.testing.assert_close(logits, ref, rtol=0, atol=0)


def test_vit_aliases(small_vit):
    hm = small_vit
    x = batch_for(hm)
    names = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.1.attn.hook_pattern",
             "blocks.1.attn.hook_z", "blocks.1.mlp.hook_post", "blocks.1.hook_resid_mid",
             "blocks.1.hook_attn_out"]
    _, cache = hm.run_with_cache(x, names=names)
    torch.testing.assert_close(cache["blocks.0.hook_resid_post"], cache["blocks.1.hook_resid_pre"],
                               rtol=0, atol=0)
    pattern = cache["blocks.1.attn.hook_pattern"]
    heads = hm.model.blocks[1].attn.num_heads
    assert pattern.shape == (2, heads, 17, 17)
    torch.testing.assert_close(pattern.sum(-1), torch.ones(2, heads, 17))
    # the pattern is softmax(q k^T / sqrt(d)) of the block's own q and k
    attn = hm.model.blocks[1].attn
    h = hm.model.blocks[1].norm1(cache["blocks.1.hook_resid_pre"])
    q, k, _ = attn.qkv(h).reshape(2, 17, 3, heads, -1).permute(2, 0, 3, 1, 4)
    expect = (q @ k.transpose(-2, -1) * attn.scale).softmax(-1)
    torch.testing.assert_close(pattern, expect, rtol=1e-5, atol=1e-6)
    # resid_mid = resid_pre + attention branch output
    torch.testing.assert_close(cache["blocks.1.hook_resid_mid"],
                               cache["blocks.1.hook_resid_pre"] + cache["blocks.1.hook_attn_out"])
    z = cache["blocks.1.attn.hook_z"]
    assert z.shape == (2, 17, heads, 192 // heads)
    assert hm.point("blocks.1.attn.hook_z").unit_axis == 2
    assert hm.point("blocks.1.attn.hook_pattern").unit_axis == 1
    assert hm.point("blocks.1.mlp.hook_post").n_units == 768


def test_pattern_runs_restore_fused_attention():
    import timm
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                          depth=2)
    fused = [a.fused_attn for a in m.modules() if hasattr(a, "fused_attn")]
    from circuitlab import HookedModel
    hm = HookedModel(m, data_config={"input_size": (3, 32, 32)})
    hm.run_with_cache(batch_for(hm), names="blocks.0.attn.hook_pattern")
    assert [a.fused_attn for a in m.modules() if hasattr(a, "fused_attn")] == fused


def test_input_validation(small_resnet):
    hm = small_resnet
    with pytest.raises(CircuitlabError, match="3-channel"):
        hm(torch.randn(1, 1, 64, 64))
    with pytest.raises(CircuitlabError, match="batch axis"):
        hm.run_with_cache(torch.randn(3, 64, 64))
    x = batch_for(hm)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(CircuitlabError, match="NaN"):
        hm.run_with_cache(x, names="layer1")
    with pytest.raises(CircuitlabError, match="float"):
        hm(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(CircuitlabError, match=r"\(32, 32\) images"):
        get_model("vit")(torch.randn(1, 3, 64, 64))


def test_hook_table_is_typed(small_vit):
    t = small_vit.hook_table()
    assert str(t["name"].dtype) == "string" and str(t["units"].dtype) == "Int64"
    assert {"resid", "attn", "mlp", "classifier"} <= set(t["kind"].astype(str))
    assert not t["name"].str.endswith(".hook_in").any()  # inputs only on request
    assert "blocks.0.norm1.hook_in" in small_vit.hook_names("*.hook_in")


def test_cache_moves_to_a_device_and_warns_before_it_grows_large(small_resnet, monkeypatch):
    import warnings

    from circuitlab import cache
    hm, x = small_resnet, batch_for(small_resnet)
    _, c = hm.run_with_cache(x, names=["layer1"], grads=True, device="meta")
    assert c["layer1"].device.type == "meta" and c.grad("layer1").device.type == "meta"
    points = hm.resolve(None)
    need = sum(torch.Size(p.shape[1:]).numel() for p in points if p.shape) * x.shape[0] * 4
    monkeypatch.setattr(cache, "CACHE_WARN_BYTES", need - 1)      # just below this cache
    with pytest.warns(UserWarning, match="pass names="):
        hm.run_with_cache(x)
    monkeypatch.setattr(cache, "CACHE_WARN_BYTES", need)           # just fits
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hm.run_with_cache(x)
