"""Plain-torch reads of hook points, for loops that read the same taps thousands of times.

A ``TapReader`` runs the model and returns (logits, [activation per hook point]) through
plain forward hooks on the tapped modules, armed only during its own calls. No nnsight trace
is built per call, so the call can be compiled (``torch.compile``; its
``reduce-overhead`` mode replays CUDA graphs) and run in bf16 under autocast. Reads only: edits,
gradients of the cache and every other run go through the tracing engine (``engine``), and a
reader gives the tensors a trace saves, operation for operation (tested).

An eager reader puts its hooks on for each call and takes them off after it; a compiled one
keeps them on (its graph was traced with them; unarmed, each returns at once) until ``close``.
A reader that folds BatchNorm (``Execution.fold_batchnorm``) runs its own folded copy of the
model, made when the reader is; points whose values the folding changes (a folded
convolution's output, its norm's input) are refused. One compiled ahead of time
(``compile="aot"``) reads the logits alone, without gradients, through the model's
AOTInductor package (``aot``; the eager model where it cannot compile, one warning).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Sequence

import torch
from torch import nn

from .aot import compiled
from .errors import CircuitlabError
from .execution import Execution
from .folding import fold_batchnorm
from .hook_points import HookPoint

# the autocast dtype of each precision
_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}


class TapReader:
    """``reader(x) -> (logits, [activation of each point])``, the activations as their modules
    produced them (a point's ``view`` applied), logits in fp32."""

    def __init__(self, model: nn.Module, points: Sequence[HookPoint],
                 execution: Execution = Execution(), example: torch.Tensor = None):
        self.model, self.points, self.execution = model, list(points), execution
        self._example = None if example is None else example[:1]
        self.folded: list = []       # (convolution, norm) paths folded together
        if execution.fold_batchnorm:
            if example is None:
                raise CircuitlabError("a reader that folds BatchNorm needs an example input")
            self.model, self.folded = fold_batchnorm(model, example)
            self._check_unfolded()
        self._armed = False
        self._store: dict = {}
        self._calls: dict = {}
        self._handles = []
        self._unfused = sorted({p.needs_unfused for p in self.points if p.needs_unfused})
        self._keys = sorted({(p.module, p.io) for p in self.points if p.module})
        if execution.channels_last:
            self.model.to(memory_format=torch.channels_last)
        # eager: hooks on for each call only, so the model carries none between calls (it
        # pickles, deep-copies and runs as it did); compiled: kept on, as the compiled graph
        # was traced with them (``close`` takes them off)
        self._fn = self._forward
        self.ahead = False           # scored through an AOTInductor package (``aot``)
        if execution.compile == "aot":
            self._ahead_of_time(example)
        elif execution.compile is not None:
            self._attach()
            self._fn = torch.compile(self._forward, mode=execution.compile)

    def replica(self) -> "TapReader":
        """This reader over its own copy of its model, for another thread: a call arms hooks
        and switches attention kernels on the reader's model, so two threads share no
        reader."""
        execution = dataclasses.replace(self.execution, fold_batchnorm=False)
        if execution.compile == "aot" and not self.ahead:     # it did not compile here
            execution = dataclasses.replace(execution, compile=None)
        other = TapReader(copy.deepcopy(self.model), self.points, execution, self._example)
        other.folded = self.folded
        return other

    def _ahead_of_time(self, example) -> None:
        """Logits through the model's AOTInductor package (``aot.compiled``); where it
        cannot compile here, the eager model (one warning)."""
        if self.points:
            raise CircuitlabError("compile 'aot' reads the logits alone; read hook points "
                                  "with another compile mode")
        if example is None:
            raise CircuitlabError("a reader compiled ahead of time needs an example input")
        if self.execution.channels_last and example.dim() == 4:
            example = example.contiguous(memory_format=torch.channels_last)
        run = compiled(self.model, example)
        if run is not None:
            self.ahead, self._fn = True, self._compiled_forward(run)

    @staticmethod
    def _compiled_forward(run):
        def forward(x: torch.Tensor):
            if torch.is_grad_enabled() and x.requires_grad:
                raise CircuitlabError("a reader compiled ahead of time ('aot') gives no "
                                      "gradients; use another compile mode to differentiate")
            return run(x).float(), []
        return forward

    def _check_unfolded(self) -> None:
        changed = {(c, "output") for c, _ in self.folded} | \
            {(n, "input") for _, n in self.folded}
        for p in self.points:
            if (p.module, p.io) in changed:
                raise CircuitlabError(
                    f"{p.name} reads inside a convolution and the BatchNorm folded into it; "
                    f"read the norm's output instead, or run without fold_batchnorm")

    def _attach(self) -> None:
        for module_path, io in self._keys:
            module = self.model.get_submodule(module_path)
            if io == "output":
                hook = self._output_hook(module_path)
                self._handles.append(module.register_forward_hook(hook))
            else:
                hook = self._input_hook(module_path)
                self._handles.append(module.register_forward_pre_hook(hook))

    def _output_hook(self, path: str):
        def hook(module, args, output):
            if self._armed:
                self._record((path, "output"), output)
        return hook

    def _input_hook(self, path: str):
        def hook(module, args):
            if self._armed:
                self._record((path, "input"), args[0])
        return hook

    def _record(self, key: tuple, value: torch.Tensor) -> None:
        call = self._calls.get(key, 0)
        self._calls[key] = call + 1
        self._store[(*key, call)] = value

    def _forward(self, x: torch.Tensor):
        dtype = _AUTOCAST[self.execution.precision]
        with torch.autocast(x.device.type, dtype=dtype) if dtype else contextlib.nullcontext():
            logits = self.model(x)
        acts = []
        for p in self.points:
            t = x if not p.module and p.io == "input" else \
                logits if not p.module else self._store[(p.module, p.io, p.call)]
            acts.append(p.view(t) if p.view else t)
        return logits.float(), acts

    def __call__(self, x: torch.Tensor):
        if self.execution.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        saved = [(m, m.fused_attn) for m in (self.model.get_submodule(n)
                                              for n in self._unfused)]
        eager = self.execution.compile in (None, "aot")
        if eager:
            self._attach()
        self._armed = True
        try:
            for m, _ in saved:
                m.fused_attn = False
            if self.execution.compile != "reduce-overhead":
                return self._fn(x)
            # CUDA graphs write their outputs into buffers the next replay reuses: each call
            # starts a new step and hands out copies, so a kept reference run stays as it was
            torch.compiler.cudagraph_mark_step_begin()
            logits, acts = self._fn(x)
            return logits.clone(), [a.clone() for a in acts]
        except KeyError as e:
            raise CircuitlabError(f"hook point not reached in this forward: {e}") from None
        finally:
            self._armed = False
            self._store.clear()
            self._calls.clear()
            for m, v in saved:
                m.fused_attn = v
            if eager:
                self.close()

    def close(self) -> None:
        """Take the hooks off the model."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


@contextlib.contextmanager
def channels_last(model: nn.Module):
    """The model's 4-D weights and buffers in channels-last layout inside the block, put back
    as they were after it: a search that runs thousands of small forwards gets the faster
    layout without leaving the caller's model changed (values are not touched)."""
    moved = []
    for t in list(model.parameters()) + list(model.buffers()):
        if t.dim() == 4 and not t.is_contiguous(memory_format=torch.channels_last):
            moved.append(t)
            t.data = t.data.contiguous(memory_format=torch.channels_last)
    try:
        yield model
    finally:   # the current data, in case a buffer was updated inside the block
        for t in moved:
            t.data = t.data.contiguous()

