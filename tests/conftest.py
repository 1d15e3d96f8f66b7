import os

import pytest
import torch

os.environ.setdefault("CIRCUITLAB_OFFLINE", "1")  # never wait on a hub in tests
# Triton kernels run on a CPU only under the interpreter, which must be on before they are
# defined; on a GPU the tests run the compiled kernels
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

import circuitlab  # noqa: E402
from helpers import FAMILY_MODELS, get_model  # noqa: E402


@pytest.fixture(params=list(FAMILY_MODELS))
def family_model(request):
    return request.param, get_model(request.param)


@pytest.fixture(scope="session")
def cnn():
    """The trained synthetic CNN, one held-out image and 16 reference images."""
    hm = circuitlab.load_model("synthetic-cnn")
    x = circuitlab.synthetic.make_dataset(1, seed=123).normalized()
    refs = circuitlab.synthetic.make_dataset(16, seed=7).normalized()
    return hm, x, refs


@pytest.fixture
def small_resnet():
    return get_model("timm_resnet18")


@pytest.fixture
def small_vit():
    return get_model("vit")


# In CI every test runs but the CUDA ones: a skip for anything else (no Chromium, no console
# script, a missing dev extra) fails the run instead of passing quietly.
CUDA_SKIP = "needs a CUDA device"
_unexpected_skips: list = []


def pytest_runtest_logreport(report):
    if report.skipped and os.environ.get("CI"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else \
            str(report.longrepr)
        if CUDA_SKIP not in reason:
            _unexpected_skips.append(f"{report.nodeid}: {reason}")


def pytest_terminal_summary(terminalreporter):
    for line in _unexpected_skips:
        terminalreporter.write_line(f"CI allows only CUDA skips; skipped {line}", red=True)


def pytest_sessionfinish(session, exitstatus):
    if _unexpected_skips and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A random synthetic CNN saved as a checkpoint, and two benchmark images beside it
    (shape0.png, shape1.png)."""
    import numpy as np
    from PIL import Image

    from circuitlab import HookedModel, save_checkpoint, synthetic
    torch.manual_seed(0)
    hm = HookedModel(synthetic.build("cnn"), data_config=synthetic.DATA_CONFIG,
                     labels=list(synthetic.CLASSES), arch="synthetic_cnn")
    path = save_checkpoint(hm, tmp_path / "cnn.pt")
    data = synthetic.make_dataset(2, seed=0)
    for i in range(2):
        arr = (data.images[i].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        Image.fromarray(arr).save(tmp_path / f"shape{i}.png")
    return path
