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


def _random_circuits(hm: HookedModel, units: dict, n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        out.append({layer: torch.randperm(hm.n_units(layer), generator=g)[:len(u)].tolist()
                    for layer, u in units.items()})
    return out


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
    y = int(circuit.meta.get("target", int(hm(x).argmax(-1))))
    base = hm(x)[0]
    variants = [units, units] + _random_circuits(hm, units, n_random, seed)
    kinds = ["keep", "remove"] + ["random_keep"] * n_random
    keep_logits = hm.ablate(x, [v for v, k in zip(variants, kinds) if k != "remove"],
                            method=method, reference=reference, keep=True)[:, 0]
    remove_logits = hm.ablate(x, [units], method=method, reference=reference)[:, 0]
    logits = torch.cat([keep_logits[:1], remove_logits, keep_logits[1:]])
    n_units = sum(len(u) for u in units.values())
    rows = []
    for i, (kind, lg) in enumerate(zip(kinds, logits)):
        p = lg.softmax(-1)
        rows.append({"test": kind, "draw": max(0, i - 2) if kind == "random_keep" else 0,
                     "logit_fraction": float(lg[y] / base[y]),
                     "prob_fraction": float(p[y] / base.softmax(-1)[y]),
                     "top1_kept": bool(lg.argmax() == y), "units": n_units})
    return pd.DataFrame(rows)


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
        tags.append((label, f, sum(sizes.values())))
        for _ in range(n_random):
            variants.append({layer: torch.randperm(hm.n_units(layer), generator=g)[:n].tolist()
                             for layer, n in sizes.items()})
            tags.append(("random", f, sum(sizes.values())))
    logits = hm.ablate(x, variants, method=method, reference=reference, keep=True)[:, 0]
    p_base = base.softmax(-1)[y]
    rows = [{"circuit": t, "fraction": f, "units": n,
             "logit_fraction": float(lg[y] / base[y]),
             "prob_fraction": float(lg.softmax(-1)[y] / p_base),
             "top1_kept": float(lg.argmax() == y)} for (t, f, n), lg in zip(tags, logits)]
    return (pd.DataFrame(rows).groupby(["circuit", "fraction", "units"], sort=False)
            .mean().reset_index())
