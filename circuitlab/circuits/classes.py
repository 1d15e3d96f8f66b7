"""Class-level circuits: the units a class's images share, validated on images held out.

Each image's circuit is read for the class (``read_circuit(..., target=)``); a unit's
``share`` is the fraction of those images whose circuit chose it. The class circuit keeps the
units of share >= ``min_share`` (and the edges between them, scored by their mean over the
images that had them); it is then tested on the held-out images as every circuit is
(``faithfulness``: keep only it, remove it, random circuits of its size per layer).

>>> cc = class_circuit(hm, images, target=3, reference=refs)
>>> cc.summary()["held_out_contrast"], cc.units.head(), cc.validation
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import pandas as pd
import torch

from ..errors import CircuitlabError
from ..hooked_model import HookedModel
from .circuit import UNIT_KINDS, Circuit
from .config import ReadoutConfig
from .readout import read_circuit
from .validate import faithfulness, summarize


@dataclass
class ClassCircuit:
    """A class's circuit and the evidence for it."""

    circuit: Circuit
    units: pd.DataFrame       # every unit any image chose: share, mean energy / attribution
    per_image: pd.DataFrame   # the images it was read from: their circuit's agreement with it
    validation: pd.DataFrame  # the held-out images: what keeping / removing it does

    def summary(self) -> dict:
        v, p = self.validation, self.per_image
        return {"target": self.circuit.meta["target"], "units": int(len(self.circuit.nodes)),
                "fit_images": int(len(p)), "held_out_images": int(len(v)),
                "mean_jaccard": float(p["jaccard"].mean()),
                "held_out_contrast": float(v["keep_contrast"].mean()),
                "held_out_random_contrast": float(v["random_contrast"].mean()),
                "held_out_top1_kept": float(v["keep_top1"].mean()),
                "held_out_removed_top1_kept": float(v["remove_top1"].mean())}


def class_circuit(hm: HookedModel, images: torch.Tensor, target: int, *,
                  held_out: float = 0.25, min_share: float = 0.5,
                  config: Optional[ReadoutConfig] = None,
                  reference: Optional[torch.Tensor] = None, n_random: int = 8, seed: int = 0,
                  progress: Optional[Callable[[int, int], None]] = None,
                  **settings) -> ClassCircuit:
    """The circuit of class ``target`` over ``images`` (N, C, H, W) of that class: read on
    the first N - round(``held_out`` N) images, validated on the rest. ``config`` /
    ``settings``: the per-image readout (``ReadoutConfig``); ``reference`` images (of other
    classes) define the ablation and the contrast."""
    images = hm.check_input(images)
    cfg = (config or ReadoutConfig()).replace(**settings)
    n = images.shape[0]
    n_held = max(1, round(held_out * n)) if held_out > 0 else 0
    if not 0 < min_share <= 1:
        raise CircuitlabError(f"min_share must lie in (0, 1], got {min_share}")
    if n - n_held < 1 or n_held < 1:
        raise CircuitlabError(f"a class circuit needs images to read it on and images held "
                              f"out to test it: got {n} image(s), held_out={held_out}")
    fit, held = images[:n - n_held], images[n - n_held:]
    circuits = []
    for i in range(len(fit)):
        circuits.append(read_circuit(hm, fit[i:i + 1], target=int(target), config=cfg,
                                     reference=reference))
        if progress:
            progress(i + 1, n)
    units = _unit_table(circuits)
    chosen = units[units["share"] >= min_share]
    if chosen.empty:
        raise CircuitlabError(f"no unit is in {min_share:.0%} of the images' circuits (the "
                              f"most shared: {units['share'].max():.0%}); lower min_share")
    circuit = _class_graph(circuits, chosen, int(target), cfg, min_share)
    return ClassCircuit(circuit, units.assign(
        in_circuit=units["share"] >= min_share), _agreement(circuits, circuit),
        _validate(hm, held, circuit, cfg, reference, n_random, seed, progress, len(fit), n))


def _unit_table(circuits: list) -> pd.DataFrame:
    nodes = pd.concat([c.nodes[c.nodes["kind"].isin(UNIT_KINDS)].assign(image=i)
                       for i, c in enumerate(circuits)])
    table = nodes.groupby(["layer", "unit", "kind"], sort=False).agg(
        images=("image", "nunique"), energy=("energy", "mean"),
        attribution=("attribution", "mean")).reset_index()
    table["share"] = table["images"] / len(circuits)
    return table.sort_values(["share", "attribution"], ascending=False, kind="stable") \
        .reset_index(drop=True)


def _class_graph(circuits: list, chosen: pd.DataFrame, target: int, cfg: ReadoutConfig,
                 min_share: float) -> Circuit:
    keep = set(zip(chosen["layer"], chosen["unit"]))
    edges = pd.concat([c.edges for c in circuits])
    edges = edges[[(a, b) in keep and (c, d) in keep for a, b, c, d in zip(
        edges["src_layer"], edges["src_unit"], edges["dst_layer"], edges["dst_unit"])]]
    if len(edges):
        edges = edges.groupby(["src_layer", "src_unit", "dst_layer", "dst_unit", "kind"],
                              sort=False).agg(weight_l1=("weight_l1", "mean"),
                                              src_energy=("src_energy", "mean"),
                                              score=("score", "mean")).reset_index()
    layers = circuits[0].meta.get("layers", "")
    meta = {"target": target, "label": circuits[0].meta.get("label"), "read_on": "class",
            "layers": layers, "images": len(circuits), "min_share": float(min_share),
            "select_by": cfg.select_by, "ablation": cfg.ablation}
    return Circuit(chosen[["layer", "unit", "energy", "attribution", "kind"]],
                   edges if len(edges) else [], meta)


def _agreement(circuits: list, circuit: Circuit) -> pd.DataFrame:
    ours = {(layer, u) for layer, us in circuit.units.items() for u in us}
    rows = []
    for i, c in enumerate(circuits):
        theirs = {(layer, u) for layer, us in c.units.items() for u in us}
        rows.append({"image": i, "units": len(theirs), "shared": len(theirs & ours),
                     "jaccard": len(theirs & ours) / max(1, len(theirs | ours))})
    return pd.DataFrame(rows)


def _validate(hm, held, circuit, cfg, reference, n_random, seed, progress, done, n):
    rows = []
    for j in range(len(held)):
        s = summarize(faithfulness(hm, held[j:j + 1], circuit, ablation=cfg.ablation,
                                   reference=reference, n_random=n_random, seed=seed))
        rows.append({"image": done + j,
                     "keep_contrast": s["keep"].get("contrast_fraction", float("nan")),
                     "keep_logit": s["keep"]["logit_fraction"],
                     "keep_top1": bool(s["keep"]["top1_kept"]),
                     "random_contrast": s["random"].get("contrast_fraction", float("nan")),
                     "remove_top1": bool(s["remove"]["top1_kept"])})
        if progress:
            progress(done + j + 1, n)
    return pd.DataFrame(rows)
