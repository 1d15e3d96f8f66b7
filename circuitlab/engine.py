"""The tracing engine under ``HookedModel``, and the only module that imports nnsight.

One run is one ``NNsight(model).trace(x)``: the hook points asked for are visited in forward
order, each read, optionally replaced (an edit returns a new tensor) and optionally saved.
What nnsight does that the rest of circuitlab need not know, and must not be surprised by:

- ``NNsight(model)`` builds an envoy tree over the module tree once; envoys are looked up by
  dotted path and cached here (``_env``). The model's modules are not replaced.
- The body of a ``with envoy.trace(x)`` block does not run where it is written: nnsight
  captures it and runs it interleaved with the real forward, in another frame. Assignments
  made inside never escape it; a value leaves only through ``nnsight.save``. So nothing but
  this module opens a trace, and the body below is plain reads, writes and saves.
- A module called more than once per forward (a shared ReLU) is reached call by call with
  ``tracer.iter[call]``; call 0 is the plain ``.output`` / ``.input``.
- timm's fused attention never materialises its probabilities: runs that read an attention
  pattern switch ``fused_attn`` off on just those modules and restore it afterwards (ours,
  not nnsight's, but a global effect on the model all the same).
- Gradients flow through reads and replacements as through the plain forward.

Plain calls (``HookedModel.__call__``) bypass the engine entirely.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Optional, Sequence

import nnsight
import torch
from nnsight import NNsight
from torch import nn

# an edit gets the activation as the hook point shows it and the hook name; a returned tensor
# replaces it, None leaves it
HookFn = Callable[[torch.Tensor, str], Optional[torch.Tensor]]


class TraceEngine:
    """Runs a model once with reads, edits and saves at hook points (``HookPoint`` records:
    ``module``, ``io``, ``call``, ``order``, ``view`` / ``unview``, ``needs_unfused``)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._envoy = NNsight(model)
        self._envoys: dict[str, object] = {}

    @contextlib.contextmanager
    def unfused(self, modules: Iterable[nn.Module]):
        """timm attention modules with their fused kernel off for the duration."""
        saved = [(m, m.fused_attn) for m in modules]
        try:
            for m, _ in saved:
                m.fused_attn = False
            yield
        finally:
            for m, v in saved:
                m.fused_attn = v

    def _env(self, module_path: str):
        env = self._envoys.get(module_path)
        if env is None:
            env = self._envoy.get(module_path) if module_path else self._envoy
            self._envoys[module_path] = env
        return env

    @staticmethod
    def _read(tracer, env, io: str, call: int):
        if call == 0:
            return env.output if io == "output" else env.input
        for _ in tracer.iter[call]:
            value = env.output if io == "output" else env.input
        return value

    @staticmethod
    def _write(tracer, env, io: str, call: int, value):
        if call == 0:
            if io == "output":
                env.output = value
            else:
                env.input = value
            return
        for _ in tracer.iter[call]:
            if io == "output":
                env.output = value
            else:
                env.input = value

    @staticmethod
    def _plan(saves, edits) -> list[dict]:
        """One step per (module, io, call) touched, in forward order, with its edits and
        saves (several hook points may share one tensor: a module and its alias)."""
        groups: dict[tuple, dict] = {}
        for hp in list(saves) + [hp for hp, _ in edits]:
            groups.setdefault((hp.module, hp.io, hp.call), {"hp": hp, "edits": [], "saves": []})
        for hp in saves:
            groups[(hp.module, hp.io, hp.call)]["saves"].append(hp)
        for hp, fn in edits:
            groups[(hp.module, hp.io, hp.call)]["edits"].append((hp, fn))
        return sorted(groups.values(), key=lambda g: g["hp"].order)

    def run(self, x: torch.Tensor, saves: Sequence = (),
            edits: Sequence[tuple[object, HookFn]] = ()):
        """Apply ``edits`` and save ``saves`` in one forward of ``x``.

        Returns (logits, {name: tensor as the module produced it, after edits})."""
        steps = self._plan(saves, edits)
        needs = {hp.needs_unfused for g in steps for hp in [g["hp"]] + g["saves"] +
                 [e[0] for e in g["edits"]] if hp.needs_unfused}
        saved: dict[str, torch.Tensor] = {}
        with self.unfused(self.model.get_submodule(n) for n in needs):
            with self._envoy.trace(x) as tracer:
                for step in steps:
                    hp = step["hp"]
                    env = self._env(hp.module)
                    value = self._read(tracer, env, hp.io, hp.call)
                    changed = False
                    for ehp, fn in step["edits"]:
                        public = ehp.view(value) if ehp.view else value
                        new = fn(public, ehp.name)
                        if new is not None:
                            value = ehp.unview(new) if ehp.unview else new
                            changed = True
                    if changed:
                        self._write(tracer, env, hp.io, hp.call, value)
                    for shp in step["saves"]:
                        saved[shp.name] = nnsight.save(value)
                logits = nnsight.save(self._envoy.output)
        return logits, saved
