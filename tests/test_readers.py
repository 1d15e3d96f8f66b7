"""TapReader (plain-torch reads for hot loops) against the nnsight trace, every family; its
precision, layout and compile settings."""
import dataclasses

import pytest
import torch

import circuitlab
from circuitlab import CircuitlabError
from circuitlab.explain import ExplainConfig
from circuitlab.execution import Execution
from circuitlab.readers import TapReader, channels_last
from helpers import batch_for, get_model
from test_hooked_model import _names_to_check


def test_reader_equals_the_trace_in_the_order_given(family_model):
    key, hm = family_model
    names = _names_to_check(hm)[::-1]            # not forward order: the caller's order
    x = batch_for(hm).requires_grad_(True)
    logits, acts = hm.reader(names)(x)
    ref_logits, cache = hm.run_with_cache(x.detach(), names=names)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    for n, a in zip(names, acts):
        torch.testing.assert_close(a, cache[n], rtol=0, atol=0, msg=f"{key}: {n}")
    # gradients flow through the read activations as through the model
    tap = names.index(hm.taps[-1])
    g, = torch.autograd.grad(acts[tap].pow(2).sum(), x)
    x2 = x.detach().requires_grad_(True)
    h = hm.model.get_submodule(hm.point(hm.taps[-1]).module)
    out = {}
    handle = h.register_forward_hook(lambda m, a, o: out.setdefault("t", o))
    try:
        hm.model(x2)
    finally:
        handle.remove()
    ref, = torch.autograd.grad(out["t"].pow(2).sum(), x2)
    torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6)


def test_reader_later_calls_views_and_fused_attention(small_vit):
    hm = get_model("tv_resnet18")
    x = batch_for(hm)
    names = ["layer1.0.relu@1", "layer1.0.relu"]
    _, acts = hm.reader(names)(x)
    _, cache = hm.run_with_cache(x, names=names)
    for n, a in zip(names, acts):
        torch.testing.assert_close(a, cache[n], rtol=0, atol=0)
    vit = small_vit
    names = ["blocks.1.attn.hook_pattern", "blocks.1.attn.hook_z", "blocks.0.hook_resid_post"]
    fused = [m.fused_attn for m in vit.model.modules() if hasattr(m, "fused_attn")]
    x = batch_for(vit)
    _, acts = vit.reader(names)(x)
    _, cache = vit.run_with_cache(x, names=names)
    for n, a in zip(names, acts):
        torch.testing.assert_close(a, cache[n], rtol=0, atol=0)
    assert [m.fused_attn for m in vit.model.modules() if hasattr(m, "fused_attn")] == fused


def test_a_replica_reads_the_same_on_its_own_copy_from_another_thread(small_vit):
    """``replica``: a reader for another thread; both at once read what the trace reads, and
    each model's attention kernels are as they were after."""
    from concurrent.futures import ThreadPoolExecutor
    vit = small_vit
    names = ["blocks.1.attn.hook_pattern", "blocks.0.hook_resid_post"]
    read = vit.reader(names)
    twin = read.replica()
    assert twin.model is not read.model
    fused = [[m.fused_attn for m in r.model.modules() if hasattr(m, "fused_attn")]
             for r in (read, twin)]
    x = batch_for(vit)
    ref_logits, cache = vit.run_with_cache(x, names=names)
    with ThreadPoolExecutor(2) as pool:       # one thread a reader, both at once
        outs = sum(pool.map(lambda r: [r(x) for _ in range(4)], [read, twin]), [])
    for logits, acts in outs:
        torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
        for n, a in zip(names, acts):
            torch.testing.assert_close(a, cache[n], rtol=0, atol=0)
    assert fused == [[m.fused_attn for m in r.model.modules() if hasattr(m, "fused_attn")]
                     for r in (read, twin)]


def test_an_eager_reader_leaves_no_hook_on_the_model():
    import copy
    import pickle
    hm = get_model("timm_resnet18")
    x = batch_for(hm)
    before = hm(x)
    n_hooks = len(hm.model.layer2._forward_hooks)
    reader = hm.reader(["layer2", "layer3"])
    assert reader is hm.reader(["layer2", "layer3"])         # kept: compiles once
    reader(x)
    assert len(hm.model.layer2._forward_hooks) == n_hooks   # on for the call only
    assert not reader._store                                 # nothing kept between calls
    torch.testing.assert_close(hm(x), before, rtol=0, atol=0)
    patched = hm.run_with_hooks(x, fwd_hooks=[("layer2", lambda a, n: a * 0)])
    assert not torch.equal(patched, before)
    copy.deepcopy(hm.model)
    pickle.dumps(hm.model)                                   # a user's torch.save(model)
    with pytest.raises(RuntimeError):
        reader(x[:, :2])                                     # a forward that fails
    assert len(hm.model.layer2._forward_hooks) == n_hooks
    eighth = dataclasses.replace(hm.point("layer2"), call=7)   # a call that never comes
    with pytest.raises(CircuitlabError, match="not reached"):
        TapReader(hm.model, [eighth])(x)
    assert len(hm.model.layer2._forward_hooks) == n_hooks


def test_a_compiled_reader_keeps_its_hooks_until_closed():
    hm = circuitlab.load_model("synthetic-cnn")
    module = hm.model.get_submodule(hm.point(hm.taps[0]).module)
    n = len(module._forward_hooks)
    reader = hm.reader(list(hm.taps), Execution(compile="default"))
    assert len(module._forward_hooks) == n + 1
    reader.close()
    assert len(module._forward_hooks) == n


def test_bf16_reads_bf16_activations_and_fp32_logits():
    hm = circuitlab.load_model("synthetic-cnn")
    x = batch_for(hm, b=4)
    logits, acts = hm.reader(list(hm.taps))(x)
    lb, ab = hm.reader(list(hm.taps), Execution("bf16"))(x)
    assert lb.dtype == torch.float32 and all(a.dtype == torch.bfloat16 for a in ab)
    assert torch.equal(lb.argmax(-1), logits.argmax(-1))
    # bf16 keeps 8 bits of mantissa: within a few per cent of the logit range, not equal
    err = float((lb - logits).abs().max() / logits.abs().max())
    assert 0 < err < 0.05


def test_channels_last_reads_the_same_values():
    hm = circuitlab.load_model("synthetic-cnn")   # its own copy: the layout stays converted
    x = batch_for(hm, b=2)
    logits, acts = hm.reader(list(hm.taps))(x)
    lc, ac = hm.reader(list(hm.taps), Execution(channels_last=True))(x)
    w = next(p for p in hm.model.parameters() if p.dim() == 4)
    assert w.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(lc, logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(ac, acts):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_channels_last_block_puts_the_layout_back():
    """``readers.channels_last``: inside, every 4-D weight in channels-last layout and the
    model reads what it read before; after, the layout it had and the same values, also when
    the block raises."""
    hm = circuitlab.load_model("synthetic-cnn")
    x = batch_for(hm, b=2)
    before = {n: p.detach().clone() for n, p in hm.model.named_parameters()}
    logits = hm(x)
    four_d = [p for p in hm.model.parameters() if p.dim() == 4]
    with pytest.raises(RuntimeError):
        with channels_last(hm.model):
            assert all(p.is_contiguous(memory_format=torch.channels_last) for p in four_d)
            assert not all(p.is_contiguous() for p in four_d)
            torch.testing.assert_close(hm(x.contiguous(memory_format=torch.channels_last)),
                                       logits, rtol=1e-5, atol=1e-5)
            raise RuntimeError("inside the block")
    assert all(p.is_contiguous() for p in four_d)
    for n, p in hm.model.named_parameters():
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("bad", [dict(precision="fp8"), dict(compile="fastest")])
def test_unknown_execution_settings_are_refused(bad):
    with pytest.raises(CircuitlabError, match="precision|compile"):
        Execution(**bad)
    with pytest.raises(CircuitlabError, match="precision|compile"):
        ExplainConfig(**bad)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_reader_matches_eager(mode):
    hm = circuitlab.load_model("synthetic-cnn")
    names = list(hm.taps)
    eager = hm.reader(names)
    comp = hm.reader(names, Execution(compile=mode))
    with torch.no_grad():                  # a kept reference run outlives later calls
        kept_logits, kept_acts = comp(batch_for(hm, b=2, seed=5))
        ref_logits = kept_logits.clone()
    for b in (2, 3):                       # a batch that shrinks (images leave it) recompiles
        x = batch_for(hm, b=b).requires_grad_(True)
        (le, ae), (lc, ac) = eager(x), comp(x)
        torch.testing.assert_close(lc, le, rtol=1e-4, atol=1e-4)
        for a, c in zip(ae, ac):
            torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-4)
        ge, = torch.autograd.grad(sum(a.pow(2).sum() for a in ae), x)
        gc, = torch.autograd.grad(sum(a.pow(2).sum() for a in ac), x)
        # fused kernels sum in another order: the gradient of a sum of squares moves by 1e-4
        torch.testing.assert_close(gc, ge, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(kept_logits, ref_logits, rtol=0, atol=0)


def test_explain_cli_runs_in_bf16_and_records_it(tmp_path, capsys):
    from circuitlab.cli import main
    out = tmp_path / "e"
    code = main(["explain", "--model", "synthetic-cnn", "--image", "synthetic:3", "--out",
                 str(out), "--no-minimal", "--steps", "30", "--precision", "bf16", "--json"])
    _, err = capsys.readouterr()
    assert code == 0, err
    import json
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["execution"] == {"precision": "bf16", "compile": None,
                                    "channels_last": False, "fold_batchnorm": False}
    assert metrics["top1_kept"] in (True, False) and 0 < metrics["area_fraction"] <= 1
    code = main(["explain", "--model", "synthetic-cnn", "--image", "synthetic:3", "--out",
                 str(tmp_path / "f"), "--precision", "fp16"])
    assert code == 2 and "invalid choice" in capsys.readouterr().err


def test_explain_cli_folds_batchnorm_on_request_and_records_it(tmp_path, capsys):
    """--fold-batchnorm: the loop's reader runs a folded copy (the synthetic CNN has four
    norms), metrics.json says so, the model the checks run is the unfolded one; a flag of
    per-image mode, refused in regions mode."""
    import json
    from circuitlab.cli import main
    from circuitlab import readers
    made = []
    init = readers.TapReader.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(len(self.folded))

    readers.TapReader.__init__ = spy
    try:
        code = main(["explain", "--model", "synthetic-cnn", "--image", "synthetic:3", "--out",
                     str(tmp_path / "e"), "--no-minimal", "--steps", "30",
                     "--fold-batchnorm", "--json"])
    finally:
        readers.TapReader.__init__ = init
    assert code == 0, capsys.readouterr().err
    assert made and all(n == 4 for n in made)
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["execution"]["fold_batchnorm"] is True
    capsys.readouterr()
    code = main(["explain", "--model", "synthetic-cnn", "--image", "synthetic:3", "--out",
                 str(tmp_path / "f"), "--mode", "regions", "--fold-batchnorm"])
    err = capsys.readouterr().err
    assert code == 2 and "--fold-batchnorm" in err and len(err.strip().splitlines()) == 1


def test_gpu_throughput_plan_covers_the_issue_grid():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
    spec = importlib.util.spec_from_file_location("throughput_plan", path)
    import sys
    # benchmarks/ and analyses/ each have a _common module: this one's, for this import only
    other = sys.modules.pop("_common", None)
    sys.path.insert(0, str(path.parent))
    try:
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(path.parent))
        sys.modules.pop("_common", None)
        if other is not None:
            sys.modules["_common"] = other
    rows = mod.plans("explain", [1, 16, 64, 256], 256, 2, gpu=True, quick=False)
    assert {(b, p) for b, p, _, _ in rows} >= {(1, 1), (16, 1), (64, 1), (256, 1), (256, 2)}
    assert {(pr, c) for _, _, pr, c in rows} == {("fp32", "off"), ("bf16", "off"),
                                                 ("fp32", "reduce-overhead"),
                                                 ("bf16", "reduce-overhead")}
    cpu = mod.plans("explain", [1, 4, 16, 64], 64, 2, gpu=False, quick=False)
    assert {(pr, c) for _, _, pr, c in cpu} == {("fp32", "off")}
    assert mod.plans("circuit", [1, 4, 16, 64], 64, 1, gpu=False, quick=False) == \
        [(1, 1, "fp32", "off"), (16, 1, "fp32", "off")]
