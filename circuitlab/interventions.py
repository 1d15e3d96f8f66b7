"""Interventions on units, batched: which units each variant touches, what replaces them
(zero, the reference mean, a resampled reference, a patch source), and the runs that apply
every variant in a few forwards instead of one forward per unit.

A *variant* maps hook names to units (indices, a slice or a boolean mask). Rows of a batched
run are variant-major: row = variant * B + sample. ``HookedModel.ablate`` and
``HookedModel.patch`` are the public doors; this module holds their machinery.
"""
from __future__ import annotations

from typing import Callable, Sequence, Union

import torch

from .errors import CircuitlabError
from .hook_points import HookPoint

Units = Union[int, slice, Sequence[int], torch.Tensor]
Variant = dict  # hook name -> units
ABLATIONS = ("zero", "mean", "resample")


def unit_mask(hp: HookPoint, units: Units) -> torch.Tensor:
    """(n_units,) bool: the units of ``hp`` that ``units`` names."""
    n = hp.n_units
    if n is None:
        raise CircuitlabError(f"hook point {hp.name!r} has no unit axis to ablate")
    mask = torch.zeros(n, dtype=torch.bool)
    if isinstance(units, torch.Tensor) and units.dtype == torch.bool:
        if units.numel() != n:
            raise CircuitlabError(f"a boolean unit mask for {hp.name!r} needs {n} entries, "
                                  f"got {units.numel()}")
        return units.reshape(n).cpu().clone()
    if isinstance(units, slice):
        mask[units] = True
        return mask
    idx = torch.as_tensor([units] if isinstance(units, int) else list(units),
                          dtype=torch.long).reshape(-1)
    if idx.numel() and (idx.min() < -n or idx.max() >= n):
        raise CircuitlabError(f"{hp.name!r} has {n} units; got unit indices "
                              f"{idx.tolist()[:10]}")
    mask[idx] = True
    return mask


def variant_masks(variants, point: Callable[[str], HookPoint],
                  keep: bool) -> tuple[list[Variant], dict]:
    """(the variants as a list, {name: (hook point, (V, n_units) bool of units replaced)});
    ``keep``: every unit of a named layer but the variant's is replaced."""
    if isinstance(variants, dict):
        variants = [variants]
    variants = list(variants)
    if not variants:
        raise CircuitlabError("no intervention variants given")
    layers: dict[str, HookPoint] = {}
    for v in variants:
        if not isinstance(v, dict):
            raise CircuitlabError("each variant is a dict {hook name: units}")
        for name in v:
            if name not in layers:
                layers[name] = point(name)
    masks = {}
    for name, hp in layers.items():
        rows = []
        for v in variants:
            if name in v:
                m = unit_mask(hp, v[name])
                rows.append(~m if keep else m)
            else:
                rows.append(torch.zeros(hp.n_units, dtype=torch.bool))
        masks[name] = (hp, torch.stack(rows))
    return variants, masks


def ablation_values(ablation: str, names, reference_acts: Callable[[], dict],
                    seed: int) -> dict:
    """{name: replacement}: a tensor broadcastable to the rows, or a callable
    ``(rows, start) -> tensor`` drawing per row. ``reference_acts()`` runs the references
    (only for mean and resample)."""
    if ablation not in ABLATIONS:
        raise CircuitlabError(f"unknown ablation {ablation!r}; use one of "
                              f"{', '.join(ABLATIONS)}")
    if ablation == "zero":
        return {n: torch.zeros(()) for n in names}
    ref = reference_acts()
    if ablation == "mean":
        return {n: ref[n].mean(0, keepdim=True) for n in names}
    gen = torch.Generator().manual_seed(seed)

    def draw(rows, _start, acts):
        return acts[torch.randint(acts.shape[0], (rows,), generator=gen)]
    return {n: (lambda rows, start, a=ref[n]: draw(rows, start, a)) for n in names}


def patch_values(source_acts: dict, b: int) -> dict:
    """{name: (rows, start) -> the source's activation repeated for every variant}."""
    return {n: (lambda rows, start, a=a: a.expand(b, *a.shape[1:]).repeat(
        rows // b, *([1] * (a.dim() - 1)))) for n, a in source_acts.items()}


def run_variants(run, x: torch.Tensor, n_variants: int, masks: dict, values: dict,
                 batch_size: int) -> torch.Tensor:
    """Logits (V, B, classes): every variant of ``x`` in batches of about ``batch_size``
    rows, ``run(xs, edits=...)`` being one traced forward (``TraceEngine.run``)."""
    b = x.shape[0]
    per_chunk = max(1, batch_size // b)
    outs = []
    for start in range(0, n_variants, per_chunk):
        nv = min(per_chunk, n_variants - start)
        xs = x.repeat(nv, 1, 1, 1)
        edits = []
        for name, (hp, mask) in masks.items():
            rows = mask[start:start + nv].repeat_interleave(b, dim=0)  # (nv*b, units)
            if not rows.any():
                continue
            value = values[name]
            value = value(nv * b, start) if callable(value) else value

            def edit(a, _n, rows=rows, value=value, hp=hp):
                shape = [1] * a.dim()
                shape[0], shape[hp.unit_axis] = rows.shape
                m = rows.to(a.device).view(shape)
                return torch.where(m, value.to(device=a.device, dtype=a.dtype), a)
            edits.append((hp, edit))
        logits, _ = run(xs, edits=edits)
        outs.append(logits.detach().reshape(nv, b, -1))
    return torch.cat(outs)
