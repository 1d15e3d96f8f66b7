"""The ``Circuit``: tidy node and edge tables, a networkx graph, and exports."""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import networkx as nx
import pandas as pd

from ..files import write_atomic, write_text
from . import drawing

# node kinds that are units of a hooked layer (what ablation and patching take); the rest are
# pooled features and classes
UNIT_KINDS = ("unit", "head", "neuron")
NODE_COLUMNS = {"layer": "string", "unit": "int64", "energy": "float64",
                "attribution": "float64", "kind": "string"}
EDGE_COLUMNS = {"src_layer": "string", "src_unit": "int64", "dst_layer": "string",
                "dst_unit": "int64", "weight_l1": "float64", "src_energy": "float64",
                "score": "float64", "kind": "string"}


def typed(df: Union[pd.DataFrame, list], columns: dict) -> pd.DataFrame:
    """``columns`` of a table or of a list of row dicts, with their dtypes. Built column by
    column: four times faster than ``astype`` on the table, which on a small model was
    most of a readout."""
    if isinstance(df, list):
        data = {c: [r[c] for r in df] for c in columns}
    else:
        data = {c: df[c].to_numpy() if not df.empty else [] for c in columns}
    return pd.DataFrame({c: pd.array(v, dtype=t) for (c, v), t in
                         zip(data.items(), columns.values())})


@dataclass
class Circuit:
    """Nodes (units per layer, ``layer`` = HookedModel hook name) and scored edges, given
    as tables or lists of row dicts with the columns of NODE_COLUMNS and EDGE_COLUMNS."""

    nodes: pd.DataFrame
    edges: pd.DataFrame
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.nodes = typed(self.nodes, NODE_COLUMNS)
        self.edges = typed(self.edges, EDGE_COLUMNS)

    @property
    def units(self) -> dict:
        """{layer: [units]} of the circuit's unit nodes (what ablation and patching take);
        a tapped layer where no unit was chosen maps to [] (keep-only ablates all of it)."""
        n = self.nodes[self.nodes["kind"].isin(UNIT_KINDS)]
        out = {layer: [] for layer in str(self.meta.get("layers", "")).split(",") if layer}
        for layer, g in n.groupby("layer", sort=False):
            out[layer] = sorted(int(u) for u in g["unit"])
        return out

    def to_networkx(self) -> nx.DiGraph:
        g = nx.DiGraph(**{k: v for k, v in self.meta.items()
                          if isinstance(v, (str, int, float, bool))})
        for r in self.nodes.itertuples():
            g.add_node(f"{r.layer}:{r.unit}", layer=r.layer, unit=int(r.unit),
                       energy=float(r.energy), attribution=float(r.attribution), kind=r.kind)
        for r in self.edges.itertuples():
            g.add_edge(f"{r.src_layer}:{r.src_unit}", f"{r.dst_layer}:{r.dst_unit}",
                       weight_l1=float(r.weight_l1), src_energy=float(r.src_energy),
                       score=float(r.score), kind=r.kind)
        return g

    # ------------------------------------------------------------------ exports
    def to_json(self) -> str:
        return json.dumps({"meta": self.meta, "nodes": self.nodes.to_dict("records"),
                           "edges": self.edges.to_dict("records")}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Circuit":
        obj = json.loads(text)
        return cls(pd.DataFrame(obj["nodes"]), pd.DataFrame(obj["edges"]), obj.get("meta", {}))

    @classmethod
    def from_csv(cls, nodes: Union[str, os.PathLike], edges: Union[str, os.PathLike]):
        return cls(pd.read_csv(nodes), pd.read_csv(edges))

    @classmethod
    def from_parquet(cls, nodes: Union[str, os.PathLike], edges: Union[str, os.PathLike]):
        return cls(pd.read_parquet(nodes), pd.read_parquet(edges))

    def save(self, folder: Union[str, os.PathLike]) -> Path:
        """nodes.csv, edges.csv, nodes.parquet, edges.parquet, circuit.graphml and
        circuit.json in ``folder``, each written atomically."""
        folder = Path(folder)
        for name, df in (("nodes.parquet", self.nodes), ("edges.parquet", self.edges)):
            write_atomic(folder / name, lambda f, d=df: d.to_parquet(f, index=False))
        write_text(folder / "nodes.csv", self.nodes.to_csv(index=False))
        write_text(folder / "edges.csv", self.edges.to_csv(index=False))
        write_text(folder / "circuit.json", self.to_json())
        buf = io.BytesIO()
        nx.write_graphml(self.to_networkx(), buf)
        write_atomic(folder / "circuit.graphml", lambda f: f.write(buf.getvalue()))
        return folder

    def diff(self, other: "Circuit") -> pd.DataFrame:
        """Unit nodes of either circuit: in which (``both``, ``self``, ``other``), with both
        energies; e.g. the explanation's circuit against the full image's."""
        a = self.nodes[self.nodes["kind"].isin(UNIT_KINDS)][["layer", "unit", "energy"]]
        b = other.nodes[other.nodes["kind"].isin(UNIT_KINDS)][["layer", "unit", "energy"]]
        m = a.merge(b, on=["layer", "unit"], how="outer", suffixes=("_self", "_other"),
                    indicator=True)
        m["in"] = m.pop("_merge").map({"both": "both", "left_only": "self",
                                       "right_only": "other"}).astype("string")
        return m.sort_values(["layer", "unit"]).reset_index(drop=True)

    def plot(self, path: Union[str, os.PathLike, None] = None, ax=None, title=None,
             max_edges: int = 300, edge_mass: float = 0.8):
        """The layered drawing (``circuits.drawing``): layers named, units labelled and sized
        by effect, classes by name and probability, the strongest edges by score and sign,
        a legend. Writes PNG or SVG (by suffix) atomically when ``path`` is given."""
        return drawing.plot(self, path, ax, title, max_edges, edge_mass)

    def to_html(self, path: Union[str, os.PathLike], crops: Optional[dict] = None,
                max_edges: int = 300, edge_mass: float = 0.8) -> Path:
        """The same graph as a self-contained interactive page (hover: layer, unit, effect
        and, with ``crops`` from ``drawing.unit_crops``, where the unit fires)."""
        return drawing.to_html(self, path, crops, max_edges, edge_mass)

    def __repr__(self) -> str:
        layers = ", ".join(f"{k}: {len(v)}" for k, v in self.units.items())
        return f"Circuit({len(self.nodes)} nodes [{layers}], {len(self.edges)} edges)"
