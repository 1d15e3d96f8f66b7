"""Ahead-of-time compiled forwards (``aot``): the eager model's logits, compiled once per
model and input and then loaded from the cache, a free batch size, and the eager model with
one warning where it cannot compile."""
import os
import warnings

import pytest
import torch
from torch import nn

import circuitlab
from circuitlab import CircuitlabError, aot
from circuitlab.execution import Execution


def _net(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), nn.ReLU6(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    with torch.no_grad():       # a BatchNorm that is not the identity
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache for the module: each package compiles once (seconds each)."""
    root = tmp_path_factory.mktemp("cache")
    saved = os.environ.get("CIRCUITLAB_CACHE")
    os.environ["CIRCUITLAB_CACHE"] = str(root)
    yield root
    if saved is None:
        del os.environ["CIRCUITLAB_CACHE"]
    else:
        os.environ["CIRCUITLAB_CACHE"] = saved


def test_compiled_logits_are_the_eager_ones_at_any_batch(cache):
    net, example = _net(), torch.randn(1, 3, 16, 16)
    run = aot.compiled(net, example)
    assert run is not None
    for b in (1, 3, 8):                        # compiled for a free batch size
        x = torch.randn(b, 3, 16, 16)
        with torch.no_grad():
            torch.testing.assert_close(run(x), net(x), rtol=1e-4, atol=1e-5)
    assert list((cache / "compiled").glob("*.pt2")) == \
        [aot.package_path(aot.package_key(net, example))]


def test_a_package_compiles_once_and_then_loads(cache, monkeypatch):
    net, example = _net(), torch.randn(1, 3, 16, 16)
    aot.compiled(net, example)                 # compiled here or by the test before
    monkeypatch.setattr(aot, "_compile", lambda *a: pytest.fail("compiled again"))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(aot.compiled(net, example)(x), net(x),
                                   rtol=1e-4, atol=1e-5)


def test_the_key_is_what_the_package_depends_on():
    net, example = _net(), torch.randn(1, 3, 16, 16)
    key = aot.package_key(net, example)
    assert aot.package_key(_net(), torch.randn(4, 3, 16, 16)) == key   # values, batch: no
    assert aot.package_key(_net(seed=1), example) != key                # weights
    assert aot.package_key(net, torch.randn(1, 3, 24, 24)) != key       # input size
    assert aot.package_key(net, example.contiguous(memory_format=torch.channels_last)) != key


def test_a_broken_package_is_compiled_again(cache):
    net, example = _net(seed=2), torch.randn(1, 3, 16, 16)
    path = aot.package_path(aot.package_key(net, example))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"cut short")
    run = aot.compiled(net, example)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(run(x), net(x), rtol=1e-4, atol=1e-5)
    assert path.stat().st_size > 1000


def test_inputs_of_another_shape_are_refused(cache):
    run = aot.compiled(_net(), torch.randn(1, 3, 16, 16))
    with pytest.raises(CircuitlabError, match=r"shape \(batch, 3, 16, 16\)"):
        run(torch.randn(1, 3, 24, 24))
    with pytest.raises(CircuitlabError, match="fp32 CPU"):
        run(torch.randn(1, 3, 16, 16, dtype=torch.float64))


def _hooked(seed=0):
    return circuitlab.HookedModel(_net(seed), name="tiny",
                                  data_config={"input_size": (3, 16, 16)})


def test_a_reader_compiled_ahead_of_time_reads_the_logits(cache):
    hm = _hooked()
    x = torch.randn(3, 3, 16, 16)
    read = hm.reader([], Execution(compile="aot", channels_last=True, fold_batchnorm=True),
                     like=x)
    assert read.ahead
    with torch.no_grad():
        logits, acts = read(x)
        torch.testing.assert_close(logits, hm.model(x), rtol=1e-4, atol=1e-5)
    assert acts == []
    with pytest.raises(CircuitlabError, match="no gradients"):
        read(x.clone().requires_grad_(True))
    with pytest.raises(CircuitlabError, match="logits alone"):
        hm.reader([hm.hook_names()[0]], Execution(compile="aot"), like=x)
    with pytest.raises(CircuitlabError, match="fp32"):
        Execution(compile="aot", precision="bf16")


def test_where_it_cannot_compile_the_reader_runs_the_eager_model(cache, monkeypatch):
    def fail(*a):
        raise RuntimeError("no C++ compiler\nmore lines")
    monkeypatch.setattr(aot, "_compile", fail)
    hm = _hooked(seed=3)                       # not in the cache
    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        read = hm.reader([], Execution(compile="aot"), like=x)
    assert not read.ahead
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        assert not read.replica().ahead         # not tried again
    assert not again
    assert [str(w.message) for w in seen] == [
        "could not compile the model for this CPU (RuntimeError: no C++ compiler); running "
        "the eager model instead, which is slower"]
    with torch.no_grad():
        torch.testing.assert_close(read(x)[0], hm.model(x), rtol=0, atol=0)
