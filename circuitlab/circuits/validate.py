"""Causal tests of a circuit: keep only it, remove only it, compare with random circuits.

>>> faithfulness(hm, x, circuit, ablation="mean", reference=refs)
"""
from __future__ import annotations

from typing import Optional

import pandas as pd
import torch

from ..deprecations import renamed
from ..errors import CircuitlabError
from ..hooked_model import HookedModel
from .circuit import Circuit


def _random_circuits(hm: HookedModel, sizes: dict, n: int,
                     g: torch.Generator) -> list[dict]:
    """``n`` random circuits with ``sizes[layer]`` units in each layer."""
    return [{layer: torch.randperm(hm.n_units(layer), generator=g)[:k].tolist()
             for layer, k in sizes.items()} for _ in range(n)]


def _effects(logits: torch.Tensor, base: torch.Tensor, y: int,
             empty: Optional[torch.Tensor] = None) -> dict:
    """Target logit and probability after an intervention, relative to the clean run; with
    ``empty`` (the logits with every unit of the layers ablated) also the normalised logit
    (z - z_empty) / (z_clean - z_empty) of Wang et al. 2022: 0 = no better than ablating
    everything, 1 = the clean model."""
    out = {"logit_fraction": float(logits[y] / base[y]),
           "prob_fraction": float(logits.softmax(-1)[y] / base.softmax(-1)[y]),
           "top1_kept": bool(logits.argmax() == y)}
    if empty is not None:
        out["logit_normalized"] = float((logits[y] - empty[y]) / (base[y] - empty[y]))
    return out


@torch.no_grad()
@renamed(method="ablation")
def faithfulness(hm: HookedModel, x: torch.Tensor, circuit: Circuit, *, ablation: str = "mean",
                 reference: Optional[torch.Tensor] = None, n_random: int = 8,
                 seed: int = 0) -> pd.DataFrame:
    """One row per test on image ``x`` (1, C, H, W), target = the circuit's target class.

    - ``keep``: every unit of the circuit's layers except the circuit's is ablated
      (``ablation``: zero, mean or resample over ``reference``);
    - ``remove``: only the circuit's units are ablated (necessity);
    - ``random_keep``: random circuits of the same size per layer, kept (``n_random`` draws).

    Columns: test, draw, logit_fraction (target logit after / before), logit_normalized
    ((z - z_empty) / (z_clean - z_empty), z_empty with every unit of the layers ablated),
    prob_fraction, top1_kept, units and, with ``reference`` images, contrast_fraction:
    (z(x) - mean z(reference)) under the intervention over the same for the clean network,
    the part of the image-specific evidence the circuit carries (a circuit that ignores its
    input can keep the logit of x under mean ablation, never the contrast).
    """
    x = hm.check_input(x)
    units = circuit.units
    if not units:
        raise CircuitlabError("the circuit has no unit nodes to ablate")
    base = hm(x)[0]
    y = int(circuit.meta["target"]) if "target" in circuit.meta else int(base.argmax())
    g = torch.Generator().manual_seed(seed)
    randoms = _random_circuits(hm, {layer: len(u) for layer, u in units.items()}, n_random, g)
    nothing = {layer: [] for layer in units}
    kept = hm.ablate(x, [units, nothing] + randoms, ablation=ablation, reference=reference,
                     keep=True)[:, 0]
    empty = kept[1]
    removed = hm.ablate(x, [units], ablation=ablation, reference=reference)[:, 0]
    n_units = sum(len(u) for u in units.values())
    tests = [("keep", 0, kept[0]), ("remove", 0, removed[0])] + [
        ("random_keep", i, lg) for i, lg in enumerate(kept[2:])]
    df = pd.DataFrame([{"test": t, "draw": d, **_effects(lg, base, y, empty),
                        "units": n_units} for t, d, lg in tests])
    if reference is not None:
        # the same interventions on the reference images: how much of the clean network's
        # image-vs-reference contrast each variant keeps (0 for a circuit that ignores its
        # input, however much of the image's logit it keeps)
        c = _contrast(hm, base, y, reference, ablation, [
            ([kept[0, y]] + [lg[y] for lg in kept[2:]], [units] + randoms, True),
            ([removed[0, y]], [units], False)])
        df["contrast_fraction"] = [c[0], c[-1]] + c[1:-1]      # keep, remove, random draws
    return df


_EFFECTS = ("logit_fraction", "logit_normalized", "contrast_fraction", "prob_fraction",
            "top1_kept")


def summarize(table: pd.DataFrame) -> dict:
    """``faithfulness``'s rows as plain numbers: ``keep`` and ``remove`` (the circuit kept
    alone, removed alone) and ``random`` (the mean over the random circuits kept alone, with
    ``draws``), each with the effects the table has (logit, normalised logit, contrast and
    probability fractions, top-1 kept; for random draws the share that kept top-1)."""
    def effects(row) -> dict:
        return {k: bool(row[k]) if k == "top1_kept" else float(row[k])
                for k in _EFFECTS if k in row.index}
    rows = table.set_index("test")
    rand = table[table["test"] == "random_keep"]
    return {"keep": effects(rows.loc["keep"]), "remove": effects(rows.loc["remove"]),
            "random": {**{k: float(rand[k].astype(float).mean()) for k in _EFFECTS
                          if k in rand}, "draws": len(rand)},
            "units": int(rows.loc["keep", "units"])}


def _contrast(hm: HookedModel, base: torch.Tensor, y: int, reference: torch.Tensor,
              ablation: str, groups) -> list[float]:
    """(z(x) - mean z(reference)) under each intervention over the same for the clean
    network: the part of the image-specific evidence kept. ``groups``: (the target logits of
    x under some variants, the variants, keep) each; the variants run on the references."""
    ref = hm.check_input(reference.to(base.device))
    clean = float(base[y] - hm(ref)[:, y].mean())
    out = []
    for zx, variants, keep in groups:
        zr = hm.ablate(ref, variants, ablation=ablation, reference=reference,
                       keep=keep)[..., y].mean(1)                          # (V,)
        out += [float(a - b) / clean if clean else float("nan") for a, b in zip(zx, zr)]
    return out


@torch.no_grad()
@renamed(method="ablation")
def size_curve(hm: HookedModel, x: torch.Tensor, ranking: dict, fractions=(0.02, 0.05, 0.1,
               0.2, 0.4), *, ablation: str = "mean", reference: Optional[torch.Tensor] = None,
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
    logits = hm.ablate(x, variants, ablation=ablation, reference=reference, keep=True)[:, 0]
    rows = [{"circuit": t, "fraction": f, "units": n, **_effects(lg, base, y)}
            for (t, f, n), lg in zip(tags, logits)]
    df = pd.DataFrame(rows)
    df["top1_kept"] = df["top1_kept"].astype(float)  # a rate once averaged over draws
    return df.groupby(["circuit", "fraction", "units"], sort=False).mean().reset_index()


@torch.no_grad()
@renamed(method="ablation")
def units_needed(hm: HookedModel, x: torch.Tensor, ranking: dict,
                 fractions=(0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0), *,
                 threshold: float = 0.8, ablation: str = "mean",
                 reference: Optional[torch.Tensor] = None,
                 target: Optional[int] = None) -> pd.DataFrame:
    """How much of one layer alone carries the decision: for each layer of ``ranking``
    ({layer: units best first}) keep its top f for f in ``fractions`` (every other unit of
    that layer ablated, every other layer intact). All variants run batched.

    A diagnostic for whether a sparse circuit can exist: when one layer alone needs more than
    a fraction b of its units to keep ``threshold`` of the target logit, a circuit of b of
    every tapped layer rarely keeps it, since ablations compound across layers (a plain CNN
    whose last conv spreads the class over most channels). Columns: layer, fraction, units,
    logit_fraction, top1_kept, meets (logit_fraction >= threshold and top-1 kept) and, with
    ``reference``, contrast_fraction (as in ``faithfulness``).
    """
    x = hm.check_input(x)
    base = hm(x)[0]
    y = int(base.argmax()) if target is None else int(target)
    variants, tags = [], []
    for layer, order in ranking.items():
        n = hm.n_units(layer)
        for f in fractions:
            k = max(1, round(f * n))
            variants.append({layer: list(order[:k])})
            tags.append((layer, f, k))
    logits = hm.ablate(x, variants, ablation=ablation, reference=reference, keep=True)[:, 0]
    df = pd.DataFrame([{"layer": layer, "fraction": f, "units": k, **_effects(lg, base, y)}
                       for (layer, f, k), lg in zip(tags, logits)])
    df["meets"] = (df["logit_fraction"] >= threshold) & df["top1_kept"]
    if reference is not None:
        df["contrast_fraction"] = _contrast(hm, base, y, reference, ablation,
                                            [([lg[y] for lg in logits], variants, True)])
    return df
