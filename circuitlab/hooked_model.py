"""HookedModel: one object through which every other part of circuitlab talks to a classifier.

A façade over three rooms: hook points (``hook_points``: names, order, unit axes), the
tracing engine (``engine``: one nnsight trace per run, the only importer of nnsight) and
interventions (``interventions``: unit masks, replacement values, batched variants). Plain
calls (``hm(x)``) bypass nnsight entirely.

Hook functions receive ``(activation, name)``, not the hook-point record TransformerLens hands
its hooks as ``hook=``: a name is a stable string a user can print, compare and glob, and the
record is one call away (``hm.point(name)``: unit axis, shape, kind, module).

>>> hm = circuitlab.load_model("efficientnet_lite0")
>>> x = circuitlab.data.load_image("coffee", hm)
>>> logits, cache = hm.run_with_cache(x, names="blocks.*", grads=True)
>>> logits = hm.run_with_hooks(x, fwd_hooks=[("blocks.5", lambda a, name: a * 0)])
>>> hm.ablate(x, hm.each_unit("blocks.5"), ablation="zero")     # one variant per channel
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import pandas as pd
import torch
from torch import nn

from .cache import ActivationCache, on_device, warn_if_large
from .deprecations import renamed
from .engine import HookFn, TraceEngine
from .errors import CircuitlabError
from .families import Family, detect_family
from .hook_names import Names, PointTable
from .hook_points import HookPoint, classifier_aliases, probe, transformer_aliases
from .interventions import Variant, ablation_values, patch_values, run_variants, variant_masks
from .preprocessing import DataConfig, check_batch
from .execution import Execution
from .readers import TapReader


def _in_chans(model: nn.Module) -> Optional[int]:
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return m.in_channels
        if isinstance(m, nn.Linear):
            return None
    return None


class HookedModel:
    """A frozen classifier in eval mode with named, ordered hook points.

    Construction puts the model in eval mode, turns its parameters' ``requires_grad`` off and
    turns in-place activations off (an in-place ReLU would overwrite a cached tensor).
    """

    def __init__(self, model: nn.Module, *, name: Optional[str] = None,
                 data_config: Optional[Mapping] = None, labels: Optional[Sequence[str]] = None,
                 source: str = "module", arch: Optional[str] = None,
                 arch_kwargs: Optional[Mapping] = None):
        if not isinstance(model, nn.Module):
            raise CircuitlabError(f"expected a torch nn.Module, got {type(model).__name__}")
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for m in model.modules():
            if getattr(m, "inplace", False) is True:
                m.inplace = False
        self.model = model
        # name: what the user loaded it by ("synthetic-cnn", "resnet50", a checkpoint's arch);
        # arch and arch_kwargs: what rebuilds it (save_checkpoint records them)
        self.name = name or type(model).__name__
        self.source = source
        self.arch = arch or self.name
        self.arch_kwargs = dict(arch_kwargs or {})
        # a partial dict takes the rest from ImageNet's defaults (preprocessing.DataConfig)
        self.data_config = DataConfig.of(data_config)
        self.labels = list(labels) if labels is not None else None
        self._engine = TraceEngine(model)
        self._points: Optional[PointTable] = None
        self._family: Optional[Family] = None
        self._readers: dict = {}

    # ------------------------------------------------------------------ basic properties
    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        p = next(self.model.parameters(), None)
        return p.dtype if p is not None else torch.float32

    @property
    def input_size(self) -> tuple:
        return tuple(self.data_config["input_size"])

    @property
    def in_chans(self) -> int:
        return _in_chans(self.model) or self.input_size[0]

    def to(self, device) -> "HookedModel":
        self.model.to(device)
        return self

    def label(self, index: int) -> str:
        if self.labels is not None and 0 <= index < len(self.labels):
            return self.labels[index]
        return f"class {index}"

    def __repr__(self) -> str:
        return (f"HookedModel({self.name!r}, source={self.source}, input={self.input_size}, "
                f"device={self.device})")

    # ------------------------------------------------------------------ hook points
    def _table(self) -> PointTable:
        if self._points is None:
            example = torch.zeros((1, *self.input_size), device=self.device, dtype=self.dtype)
            attn = [m for m in self.model.modules() if hasattr(m, "fused_attn")]
            with self._engine.unfused(attn):
                try:
                    points = probe(self.model, example)
                except Exception as e:  # a user module that rejects the default input size
                    raise CircuitlabError(
                        f"could not run {self.name} on a dummy input of shape "
                        f"{tuple(example.shape)} ({type(e).__name__}: {e}); pass "
                        f"data_config={{'input_size': (C, H, W)}} to load_model") from e
            points += transformer_aliases(self.model, points)
            family = detect_family(self.model, points)
            points += classifier_aliases(points, family.classifier)
            self._points = PointTable(points, self.name)
            self._family = family
        return self._points

    @property
    def hook_points(self) -> dict[str, HookPoint]:
        """Every hook point by name, in forward order."""
        return self._table().points

    def hook_names(self, pattern: Names = None) -> list[str]:
        """Hook names (module paths, ``path@k`` later calls, ``*.hook_in`` inputs, aliases)."""
        return [p.name for p in self.resolve(pattern)]

    def hook_table(self, pattern: Names = None) -> pd.DataFrame:
        """Hook names with kind, output shape (batch 1, default input size) and unit count."""
        return self._table().table(pattern)

    def resolve(self, names: Names = None) -> list[HookPoint]:
        """Hook points for a name, a glob, a list of them or a predicate, in forward order
        (``hook_names.PointTable.resolve``)."""
        return self._table().resolve(names)

    def point(self, name: str) -> HookPoint:
        """The hook point with exactly this name."""
        return self._table().point(name)

    def n_units(self, name: str) -> int:
        p = self.point(name)
        if p.n_units is None:
            raise CircuitlabError(f"hook point {name!r} has no unit axis (shape {p.shape})")
        return p.n_units

    # ------------------------------------------------------------------ family knowledge
    @property
    def family(self) -> Family:
        self._table()
        return self._family

    @property
    def taps(self) -> tuple[str, ...]:
        """The family's default layers to tap (stem and stages for CNNs, thirds of a ViT)."""
        return self.family.taps

    @property
    def classifier(self) -> str:
        """Module path of the final classification layer."""
        return self.family.classifier

    # ------------------------------------------------------------------ input checks
    def check_input(self, x) -> torch.Tensor:
        """Validate a batch (B, C, H, W) and move it to the model's device and dtype."""
        check_batch(x, self.in_chans, self.name)
        fixed = getattr(getattr(self.model, "patch_embed", None), "img_size", None)
        strict = getattr(getattr(self.model, "patch_embed", None), "strict_img_size", False)
        if fixed is not None and strict and tuple(x.shape[2:]) != tuple(fixed):
            raise CircuitlabError(f"{self.name} takes {tuple(fixed)} images, got "
                                  f"{tuple(x.shape[2:])}; resize to the model's input size")
        return x.to(device=self.device, dtype=self.dtype)

    # ------------------------------------------------------------------ running
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.check_input(x))

    forward = __call__

    def _run(self, x: torch.Tensor, saves: Sequence[HookPoint] = (),
             edits: Sequence[tuple[HookPoint, HookFn]] = ()):
        """One traced forward (``engine.TraceEngine.run``): (logits, {name: tensor})."""
        return self._engine.run(x, saves, edits)

    def run_with_cache(self, x: torch.Tensor, names: Names = None, grads: bool = False,
                       target=None, device=None) -> tuple[torch.Tensor, ActivationCache]:
        """Forward ``x`` and record the named activations (and d target / d activation).

        ``names``: a hook name, a glob (``"layer*"``), a list of them, or a predicate; None
        means every module output and alias. ``target`` picks the logit whose gradient is
        taken: None = each sample's top-1, an int, a (B,) tensor of classes, or a callable
        ``logits -> scalar``. Gradients are per sample (the model is in eval mode).
        ``device``: move the saved tensors there (``"cpu"`` frees the GPU, as TransformerLens's
        cache can); a cache estimated above 2 GiB is warned about.
        """
        x = self.check_input(x)
        points = self.resolve(names)
        warn_if_large(points, x, grads)
        if not grads:
            logits, raw = self._run(x, saves=points)
            acts = {p.name: on_device(p.view(raw[p.name]) if p.view else raw[p.name], device)
                    for p in points}
            return logits, ActivationCache(acts, logits)
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            logits, raw = self._run(x, saves=points)
            tgt, objective = self._objective(logits, target)
            tensors = [raw[p.name] for p in points]
            gs = torch.autograd.grad(objective, tensors, allow_unused=True)
        acts, gmap = {}, {}
        for p, t, g in zip(points, tensors, gs):
            g = torch.zeros_like(t) if g is None else g
            acts[p.name] = on_device((p.view(t) if p.view else t).detach(), device)
            gmap[p.name] = on_device(p.view(g) if p.view else g, device)
        return logits.detach(), ActivationCache(acts, logits.detach(), gmap, tgt)

    def reader(self, names: Sequence[str], execution: Execution = Execution(),
               like: Optional[torch.Tensor] = None) -> TapReader:
        """A plain-torch ``reader(x) -> (logits, [activations])`` of the named points, in the
        order given, for a hot loop (``readers.TapReader``: no trace per call; compilable,
        bf16); one per (points, execution), kept, so a compiled one compiles once; one that
        folds BatchNorm or is compiled ahead of time (``aot``, cached on disk by the
        weights) is made anew, from the weights as they are now, for inputs shaped ``like``
        (default: the model's input size)."""
        points = [self.point(n) for n in ([names] if isinstance(names, str) else names)]
        key = (tuple(p.name for p in points), execution)
        if execution.fold_batchnorm or execution.compile == "aot":
            shape = self.input_size if like is None else tuple(like.shape[1:])
            example = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0))
            return TapReader(self.model, points, execution,
                             example.to(device=self.device, dtype=self.dtype))
        if key not in self._readers:
            self._readers[key] = TapReader(self.model, points, execution)
        return self._readers[key]

    def _objective(self, logits: torch.Tensor, target):
        if callable(target):
            obj = target(logits)
            if not (isinstance(obj, torch.Tensor) and obj.numel() == 1):
                raise CircuitlabError("a callable target must return a scalar tensor")
            return None, obj.reshape(())
        b, k = logits.shape[0], logits.shape[-1]
        if target is None:
            tgt = logits.detach().argmax(-1)
        else:
            tgt = torch.as_tensor(target, device=logits.device).long().reshape(-1)
            if tgt.numel() == 1:
                tgt = tgt.expand(b)
            if tgt.numel() != b:
                raise CircuitlabError(f"target has {tgt.numel()} entries for a batch of {b}")
            if (tgt < 0).any() or (tgt >= k).any():
                raise CircuitlabError(f"target classes must lie in [0, {k}), got "
                                      f"{tgt.tolist()}")
        return tgt, logits.gather(-1, tgt[:, None]).sum()

    def run_with_hooks(self, x: torch.Tensor,
                       fwd_hooks: Sequence[tuple[Union[str, Callable[[str], bool]], HookFn]]
                       ) -> torch.Tensor:
        """Forward with hooks ``fn(activation, name)``; a returned tensor replaces the activation.

        Names may be globs or predicates. Gradients flow through replacements as usual.
        """
        x = self.check_input(x)
        edits = []
        for spec, fn in fwd_hooks:
            for hp in self.resolve(spec):
                edits.append((hp, fn))
        logits, _ = self._run(x, edits=edits)
        return logits

    # ------------------------------------------------------------------ interventions
    def each_unit(self, name: str, units: Optional[Iterable[int]] = None) -> list[Variant]:
        """One variant per unit of ``name``: ``[{name: [0]}, {name: [1]}, ...]``."""
        units = range(self.n_units(name)) if units is None else units
        return [{name: [int(u)]} for u in units]

    @renamed(method="ablation")
    def ablate(self, x: torch.Tensor, variants: Union[Variant, Sequence[Variant]],
               ablation: str = "zero", reference: Optional[torch.Tensor] = None,
               keep: bool = False, batch_size: int = 64, seed: int = 0) -> torch.Tensor:
        """Logits (V, B, classes) with each variant's units ablated, all variants batched.

        A variant maps hook names to units (channel / head / neuron indices, a slice or a bool
        mask). ``keep=True`` ablates every *other* unit of each named layer (circuit
        faithfulness). ``ablation``: ``zero``; ``mean`` (the mean activation over ``reference``
        images, per position); ``resample`` (a random ``reference`` image's activation per row,
        seeded). The machinery is in ``circuitlab.interventions``.
        """
        x = self.check_input(x)
        variants, masks = variant_masks(variants, self.point, keep)

        def reference_acts():
            if reference is None:
                raise CircuitlabError(f"{ablation} ablation needs reference images: pass "
                                      f"reference=<batch (R, C, H, W)>")
            return self.run_with_cache(reference, names=list(masks))[1]
        values = ablation_values(ablation, list(masks), reference_acts, seed)
        with torch.no_grad():
            return run_variants(self._run, x, len(variants), masks, values, batch_size)

    def patch(self, x: torch.Tensor, source: torch.Tensor,
              variants: Union[Variant, Sequence[Variant]], batch_size: int = 64) -> torch.Tensor:
        """Logits (V, B, classes) of ``x`` with each variant's units taken from ``source``.

        ``source`` is a batch of the same size as ``x`` (or of 1), run once; its activations
        are patched into every variant in batched forwards.
        """
        x = self.check_input(x)
        source = self.check_input(source)
        if source.shape[0] not in (1, x.shape[0]):
            raise CircuitlabError(f"source batch {source.shape[0]} must be 1 or match x's "
                                  f"{x.shape[0]}")
        variants, masks = variant_masks(variants, self.point, keep=False)
        with torch.no_grad():
            _, src = self.run_with_cache(source, names=list(masks))
            values = patch_values({n: src[n] for n in masks}, x.shape[0])
            return run_variants(self._run, x, len(variants), masks, values, batch_size)

    # ------------------------------------------------------------------ predictions
    @torch.no_grad()
    def predict(self, x: torch.Tensor, topk: int = 5) -> pd.DataFrame:
        """Top-k classes per image as a tidy table (image, rank, class_index, label, probability)."""
        probs = self(x).softmax(-1)
        k = max(1, min(topk, probs.shape[-1]))
        p, i = probs.topk(k, dim=-1)
        rows = [(b, r + 1, int(i[b, r]), self.label(int(i[b, r])), float(p[b, r]))
                for b in range(probs.shape[0]) for r in range(k)]
        df = pd.DataFrame(rows, columns=["image", "rank", "class_index", "label", "probability"])
        return df.astype({"image": "int64", "rank": "int64", "class_index": "int64",
                          "label": "string", "probability": "float64"})
