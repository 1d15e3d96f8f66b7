"""Ahead-of-time compiled forwards for CPU hot loops: AOTInductor packages cached on disk.

A loop that scores thousands of images with one model on a CPU (the region search) runs
faster through a compiled copy: ``torch.export`` then AOTInductor with weight freezing
(prepacked oneDNN convolutions, fused pointwise operations), one shared library per model,
input size and CPU. Compiling takes seconds to tens of seconds, so a package is written
once to the cache (``files.cache_root() / "compiled"``), keyed by everything it depends on
(torch's version, the CPU's vector capability, the model's modules and weights, the input's
shape past the batch, dtype and layout), and later loads in milliseconds. The batch size is
left free. Inference only: the package returns logits without gradients.

It imports nothing of circuitlab but ``errors`` and ``files``. Where the model does not
export or compile here (no C++ compiler, an operation export cannot trace), ``compiled``
says why in one warning and returns None, and the caller runs the model eagerly.

>>> run = compiled(model, example)          # None where it cannot compile here
>>> logits = run(x)                         # x: (any batch, *example.shape[1:])
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch._inductor            # aoti_compile_and_package, aoti_load_package
import torch._inductor.config as inductor
from torch import nn

from .errors import CircuitlabError
from .files import cache_root


class _Call(nn.Module):
    """The model called as a module: ``torch.export`` reads the signature of ``forward``,
    which nnsight replaces on the models it wraps."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


class Compiled:
    """``run(x) -> logits`` through a loaded package, for inputs of the example's shape past
    the batch (others are refused: the package was compiled for that shape), laid out as
    the example was."""

    def __init__(self, runner, example: torch.Tensor):
        self.runner, self.shape = runner, tuple(example.shape[1:])
        self.layout = _layout(example)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.shape or x.dtype != torch.float32 or \
                x.device.type != "cpu":
            raise CircuitlabError(f"this compiled forward takes fp32 CPU inputs of shape "
                                  f"(batch, {', '.join(map(str, self.shape))}); got "
                                  f"{tuple(x.shape)} {x.dtype} on {x.device}")
        return self.runner(x.contiguous(memory_format=self.layout))


def _layout(example: torch.Tensor):
    cl = example.dim() == 4 and not example.is_contiguous() and example.is_contiguous(
        memory_format=torch.channels_last)
    return torch.channels_last if cl else torch.contiguous_format


def package_key(model: nn.Module, example: torch.Tensor) -> str:
    """What a compiled package depends on, hashed: torch, the CPU's vector capability, the
    model's modules and weights (values, shapes, dtypes), the input past the batch."""
    h = hashlib.sha256()
    for part in (torch.__version__, torch.backends.cpu.get_cpu_capability(), repr(model),
                 tuple(example.shape[1:]), example.dtype, _layout(example)):
        h.update(repr(part).encode())
    for name, t in list(model.state_dict().items()):
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def package_path(key: str) -> Path:
    return cache_root() / "compiled" / f"{key}.pt2"


def compiled(model: nn.Module, example: torch.Tensor) -> Optional[Compiled]:
    """``run(x) -> logits`` of ``model`` (eval mode, fp32, on the CPU) through its
    AOTInductor package for inputs like ``example`` (any batch; its layout): loaded from the
    cache, else compiled and written there first. None, with one warning saying why, where
    it cannot compile here."""
    if example.device.type != "cpu" or example.dtype != torch.float32:
        raise CircuitlabError("ahead-of-time compiled forwards are for fp32 inputs on the CPU")
    path = package_path(package_key(model, example))
    try:
        runner = _load(path) if path.exists() else None
        if runner is None:
            _compile(model, example, path)
            runner = _load(path)
            if runner is None:
                raise CircuitlabError(f"the package just compiled does not load: {path}")
    except Exception as e:          # noqa: BLE001 - any failure means: run it eagerly
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        warnings.warn(f"could not compile the model for this CPU ({type(e).__name__}: "
                      f"{first}); running the eager model instead, which is slower")
        return None
    return Compiled(runner, example)


def _load(path: Path):
    """The package at ``path``; None where it does not load (a file cut short, another
    torch): it is compiled again."""
    try:
        with _quiet():
            return torch._inductor.aoti_load_package(str(path))
    except Exception:               # noqa: BLE001 - a stale or broken file: compile anew
        return None


def _compile(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Export ``model`` with a free batch size, compile it with frozen weights and write the
    package to ``path`` whole (a temporary file in the same folder, then renamed)."""
    _compiler()
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1)
    # a batch of one would be traced as a constant size: two, then left free
    example = example[:1].expand(2, *example.shape[1:]).contiguous(
        memory_format=_layout(example))
    fd, tmp = tempfile.mkstemp(suffix=".pt2", dir=path.parent)
    os.close(fd)
    try:
        with torch.no_grad(), _quiet(), inductor.patch(freezing=True):
            program = torch.export.export(_Call(model).eval(), (example,),
                                          dynamic_shapes={"x": {0: batch}})
            torch._inductor.aoti_compile_and_package(program, package_path=tmp)
        os.chmod(tmp, 0o644)           # mkstemp's 0600: the cache is the user's, shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _compiler() -> None:
    """Raises where inductor finds no working C++ compiler, before the export's seconds."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:             # another torch: the compile itself will say
        return
    get_cpp_compiler()


@contextlib.contextmanager
def _quiet():
    """Compiling on a machine without CUDA logs a warning per compile that says nothing
    about the CPU package: kept off the user's terminal."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
