"""The frontier: how much of the decision circuits of each size keep, for every way of
choosing them, on one image.

>>> frontier(hm, x, hm.taps, refs, fractions=(0.1, 0.2, 0.4, 0.6, 0.8))

A row per (ranking, ablation, fraction): the circuit is the top ``fraction`` of all tapped
units in the ranking's order (``circuits.ranking``; ``learned`` optimises gates for that
budget instead), every other tapped unit ablated (``mean``: the reference mean per position;
``zero``; ``resample``: the value on one reference image, averaged over ``draws`` of them),
and the columns say what it keeps of the image-vs-reference contrast (references run under
the same ablation), of the target logit and probability, and whether the top-1 stays.
``smallest`` reads off the size a frontier needs for a given contrast.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import pandas as pd
import torch

from ..errors import CircuitlabError
from ..hooked_model import HookedModel
from ..interventions import ABLATIONS
from .learned import learn_units
from .ranking import RANKINGS, rank_units
from .search import prepare

SELECTIONS = RANKINGS + ("learned",)


def frontier(hm: HookedModel, x: torch.Tensor, layers: Sequence[str], reference: torch.Tensor,
             *, fractions: Sequence[float] = (0.05, 0.1, 0.2, 0.4, 0.6, 0.8),
             rankings: Sequence[str] = ("energy", "attribution", "iterative", "eap-ig",
                                        "random"),
             ablations: Sequence[str] = ("mean",), target: Optional[int] = None,
             learned_steps: int = 100, draws: int = 4, seed: int = 0,
             basis: Optional[dict] = None) -> pd.DataFrame:
    """Contrast kept against circuit size for each ranking and ablation (module docstring).
    ``basis`` ({layer: SparseDictionary}): circuits of dictionary features and error nodes
    (``circuits.basis``) instead of the layers' units."""
    for name in rankings:
        if name not in SELECTIONS:
            raise CircuitlabError(f"unknown ranking {name!r}; choose from "
                                  f"{', '.join(SELECTIONS)}")
    for name in ablations:
        if name not in ABLATIONS:
            raise CircuitlabError(f"unknown ablation {name!r}; choose from "
                                  f"{', '.join(ABLATIONS)}")
    if not fractions or not all(0 < f <= 1 for f in fractions):
        raise CircuitlabError("fractions must lie in (0, 1]")
    # the rankings score units against the mean (zero when that is the only ablation)
    first = "zero" if set(ablations) == {"zero"} else "mean"
    if basis is not None and "learned" in rankings:
        raise CircuitlabError("learned circuits gate a layer's own units; leave 'learned' "
                              "out of the rankings of a feature basis")
    s = prepare(hm, x, layers, reference, target, first, basis)
    setups = {first: [s]}
    if "zero" in ablations and first != "zero":    # the same references, values zeroed
        setups["zero"] = [dataclasses.replace(s, ablated=s.ablated.zeroed())]
    if "resample" in ablations:
        g = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(reference), generator=g)[:draws]
        setups["resample"] = [dataclasses.replace(s, ablated=a)
                              for a in s.ablated.resampled(s.batch[1:][pick])]
    total = s.ablated.total
    sizes = [max(1, round(f * total)) for f in fractions]
    rows = []
    for name in rankings:
        circuits = _circuits(s, name, sizes, reference, learned_steps, seed)
        for ablation in ablations:
            for frac, n, units in zip(fractions, sizes, circuits):
                probes = [v.probe(v.ablated.keep_masks(units)) for v in setups[ablation]]
                rows.append({"ranking": name, "ablation": ablation, "fraction": frac,
                             "units": n, "total": total,
                             **{k: sum(p[i] for p in probes) / len(probes) for i, k in
                                enumerate(("contrast", "logit_fraction", "prob_fraction",
                                           "top1_kept"))}})
    df = pd.DataFrame(rows)
    df["top1_kept"] = df["top1_kept"].astype(float)      # the share of draws that kept it
    df["target"] = s.target
    return df


def _circuits(s, name: str, sizes: list, reference, learned_steps: int, seed: int) -> list:
    """The circuit {layer: [units]} of each size for one selection."""
    ab = s.ablated
    if name == "learned":
        return [learn_units(ab.hm, s.x, ab.layers, n / ab.total, target=s.target,
                            reference=reference, steps=learned_steps, seed=seed)
                for n in sizes]
    order = rank_units(ab, s.x, s.target, name, seed=seed)
    return [ab.top(order, n) for n in sizes]


def smallest(df: pd.DataFrame, contrast: float) -> pd.DataFrame:
    """Per ranking and ablation (and model and image, where the table has them): the smallest
    fraction of the frontier keeping ``contrast`` with top-1 kept (NaN: none did)."""
    keys = [k for k in ("model", "image", "ranking", "ablation") if k in df.columns]
    ok = df[(df["contrast"] >= contrast) & (df["top1_kept"] >= 1.0)]
    best = ok.groupby(keys)["fraction"].min()
    return best.reindex(pd.MultiIndex.from_frame(df[keys].drop_duplicates())).rename(
        f"fraction_for_{contrast:g}").reset_index()
