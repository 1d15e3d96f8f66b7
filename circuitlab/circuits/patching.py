"""Per-unit causal effects: ablation and activation patching of every unit of a layer in
batched forwards, and attribution patching (gradient x activation difference) as the fast
linear estimate, with its agreement to exact patching.

>>> df = patch_units(hm, clean=e, corrupt=c, layer="blocks.4")     # one row per unit
>>> df[["exact", "attribution"]].corr()
"""
from __future__ import annotations

from typing import Optional

import pandas as pd
import torch

from ..deprecations import renamed
from ..errors import CircuitlabError
from ..hooked_model import HookedModel


def patch_units(hm: HookedModel, clean: torch.Tensor, corrupt: torch.Tensor, layer: str,
                target: Optional[int] = None, batch_size: int = 64) -> pd.DataFrame:
    """Effect on the target logit of patching each unit of ``layer`` from the ``clean`` run
    into the ``corrupt`` run (one image each).

    Columns: layer, unit, exact (logit_y(corrupt with unit u from clean) - logit_y(corrupt)),
    attribution (sum over positions of (a_clean - a_corrupt) * d logit_y / d a at corrupt).
    ``target`` defaults to the clean run's top-1. Attribution patching is exact where the
    logit is linear in the layer.
    """
    clean, corrupt = hm.check_input(clean), hm.check_input(corrupt)
    if clean.shape[0] != 1 or corrupt.shape[0] != 1:
        raise CircuitlabError("patch_units takes one clean and one corrupt image")
    hp = hm.point(layer)
    if hp.unit_axis is None:
        raise CircuitlabError(f"layer {layer!r} has no unit axis to patch")
    with torch.no_grad():
        y = int(hm(clean).argmax(-1)) if target is None else int(target)
        base = hm(corrupt)[0, y]
        exact = hm.patch(corrupt, clean, hm.each_unit(layer), batch_size=batch_size)[:, 0, y]
        _, cc = hm.run_with_cache(clean, names=[layer])
    _, cx = hm.run_with_cache(corrupt, names=[layer], grads=True, target=y)
    diff = (cc[layer] - cx[layer]) * cx.grad(layer)
    attr = hp.per_unit(diff).sum(-1)[0]
    n = len(exact)
    return pd.DataFrame({"layer": pd.array([layer] * n, dtype="string"),
                         "unit": range(n), "exact": (exact - base).cpu().numpy(),
                         "attribution": attr.detach().cpu().numpy()})


@renamed(method="ablation")
def ablate_units(hm: HookedModel, x: torch.Tensor, layer: str, ablation: str = "mean",
                 reference: Optional[torch.Tensor] = None, target: Optional[int] = None,
                 batch_size: int = 64) -> pd.DataFrame:
    """Effect of ablating each unit of ``layer`` alone on image ``x`` (one image).

    Columns: layer, unit, logit_change (logit_y ablated - logit_y), prob_change, top1_kept.
    """
    x = hm.check_input(x)
    if x.shape[0] != 1:
        raise CircuitlabError("ablate_units takes one image")
    with torch.no_grad():
        base = hm(x)[0]
        y = int(base.argmax()) if target is None else int(target)
        out = hm.ablate(x, hm.each_unit(layer), ablation=ablation, reference=reference,
                        batch_size=batch_size)[:, 0]
    n = len(out)
    return pd.DataFrame({"layer": pd.array([layer] * n, dtype="string"), "unit": range(n),
                         "logit_change": (out[:, y] - base[y]).cpu().numpy(),
                         "prob_change": (out.softmax(-1)[:, y] - base.softmax(-1)[y]).cpu()
                         .numpy(),
                         "top1_kept": (out.argmax(-1) == y).cpu().numpy()})


def agreement(df: pd.DataFrame) -> dict:
    """Pearson and Spearman correlation of attribution patching with exact patching."""
    return {"pearson": float(df["exact"].corr(df["attribution"])),
            "spearman": float(df["exact"].rank().corr(df["attribution"].rank()))}
