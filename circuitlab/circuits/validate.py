"""Causal tests of a circuit: keep only it, remove only it, compare with random circuits.

>>> faithfulness(hm, x, circuit, method="mean", reference=refs)
"""
from __future__ import annotations

from typing import Optional

import pandas as pd
import torch

from ..errors import CircuitlabError
from ..hooked_model import HookedModel
from .circuit import Circuit


def _random_circuits(hm: HookedModel, sizes: dict, n: int,
                     g: torch.Generator) -> list[dict]:
    """``n`` random circuits with ``sizes[layer]`` units in each layer."""
    return [{layer: torch.randperm(hm.n_units(layer), generator=g)[:k].tolist()
             for layer, k in sizes.items()} for _ in range(n)]


def _effects(logits: torch.Tensor, base: torch.Tensor, y: int) -> dict:
    """Target logit and probability after an intervention, relative to the clean run."""
    return {"logit_fraction": float(logits[y] / base[y]),
            "prob_fraction": float(logits.softmax(-1)[y] / base.softmax(-1)[y]),
            "top1_kept": bool(logits.argmax() == y)}


@torch.no_grad()
def faithfulness(hm: HookedModel, x: torch.Tensor, circuit: Circuit, *, method: str = "mean",
                 reference: Optional[torch.Tensor] = None, n_random: int = 8,
                 seed: int = 0) -> pd.DataFrame:
    """One row per test on image ``x`` (1, C, H, W), target = the circuit's target class.

    - ``keep``: every unit of the circuit's layers except the circuit's is ablated
      (``method``: zero, mean or resample over ``reference``);
    - ``remove``: only the circuit's units are ablated (necessity);
    - ``random_keep``: random circuits of the same size per layer, kept (``n_random`` draws).

    Columns: test, draw, logit_fraction (target logit after / before), prob_fraction,
    top1_kept, units.
    """
    x = hm.check_input(x)
    units = circuit.units
    if not units:
        raise CircuitlabError("the circuit has no unit nodes to ablate")
    base = hm(x)[0]
    y = int(circuit.meta["target"]) if "target" in circuit.meta else int(base.argmax())
    g = torch.Generator().manual_seed(seed)
    randoms = _random_circuits(hm, {layer: len(u) for layer, u in units.items()}, n_random, g)
    kept = hm.ablate(x, [units] + randoms, method=method, reference=reference,
                     keep=True)[:, 0]
    removed = hm.ablate(x, [units], method=method, reference=reference)[:, 0]
    n_units = sum(len(u) for u in units.values())
    tests = [("keep", 0, kept[0]), ("remove", 0, removed[0])] + [
        ("random_keep", i, lg) for i, lg in enumerate(kept[1:])]
    return pd.DataFrame([{"test": t, "draw": d, **_effects(lg, base, y), "units": n_units}
                         for t, d, lg in tests])


@torch.no_grad()
def size_curve(hm: HookedModel, x: torch.Tensor, ranking: dict, fractions=(0.02, 0.05, 0.1,
               0.2, 0.4), *, method: str = "mean", reference: Optional[torch.Tensor] = None,
               n_random: int = 4, seed: int = 0, target: Optional[int] = None,
               label: str = "circuit") -> pd.DataFrame:
    """Faithfulness (keep only) as the circuit grows: for each fraction f of every layer's
    units, keep the top f of ``ranking`` ({layer: units best first}) and, for comparison,
    ``n_random`` random sets of the same sizes. All variants run batched.

    Columns: circuit (``label`` or ``random``), fraction, units, logit_fraction,
    prob_fraction, top1_kept (random rows are means over draws).
    """
    x = hm.check_input(x)
    base = hm(x)[0]
    y = int(base.argmax()) if target is None else int(target)
    g = torch.Generator().manual_seed(seed)
    variants, tags = [], []
    for f in fractions:
        sizes = {layer: max(1, round(f * hm.n_units(layer))) for layer in ranking}
        variants.append({layer: list(ranking[layer][:n]) for layer, n in sizes.items()})
        variants += _random_circuits(hm, sizes, n_random, g)
        tags += [(label, f, sum(sizes.values()))] + [("random", f, sum(sizes.values()))] * \
            n_random
    logits = hm.ablate(x, variants, method=method, reference=reference, keep=True)[:, 0]
    rows = [{"circuit": t, "fraction": f, "units": n, **_effects(lg, base, y)}
            for (t, f, n), lg in zip(tags, logits)]
    df = pd.DataFrame(rows)
    df["top1_kept"] = df["top1_kept"].astype(float)  # a rate once averaged over draws
    return df.groupby(["circuit", "fraction", "units"], sort=False).mean().reset_index()
