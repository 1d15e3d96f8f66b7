"""Circuits a person can read: a layered PNG / SVG and a self-contained interactive HTML view.

Both draw the same layout: one column per layer (named), units stacked by their effect
(|attribution| on the image, the strongest on top), the class nodes last, named with their
probability. Node area follows the unit's effect; edges are the strongest of each pair of
layers, enough of them to carry ``edge_mass`` of the pair's score (at most ``max_edges`` in
all), width by score and colour by sign (blue adds to the target, red takes from it) and
kind; the drawing says how many edges it shows and what share of the score they carry.

The HTML view (bokeh, rendered offline: its JavaScript is inlined) shows on hover a node's
layer, unit, effect and energy, and with ``crops`` the patch of the image where the unit is
most active (``unit_crops``).
"""
from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pandas as pd
import torch

from ..files import write_atomic, write_text
from ..hooked_model import HookedModel

KIND_STYLE = {  # node kind -> (colour, marker)
    "unit": ("#f0a030", "o"), "head": ("#9b59b6", "D"), "neuron": ("#2e86c1", "s"),
    "feature": ("#7f8c8d", "o"), "class": ("#27ae60", "s")}


def _short(layer: str) -> str:
    return {"hook_pooled": "pooled", "hook_logits": "classes"}.get(layer, layer)


def _label(kind: str, unit: int, classes: dict) -> str:
    if kind == "class":
        c = classes.get(unit)
        return f"{c['label']} ({c['prob']:.2f})" if c else f"class {unit}"
    prefix = {"head": "h", "neuron": "n", "feature": "f"}.get(kind, "u")
    return f"{prefix}{unit}"


def layout(circuit, edge_mass: float = 0.8, max_edges: int = 300) -> dict:
    """Positions, node and edge styles of a circuit, shared by the PNG and the HTML view."""
    nodes = circuit.nodes.copy()
    layers = list(dict.fromkeys(nodes["layer"]))
    effect = nodes["attribution"].abs().where(nodes["attribution"].notna(),
                                              nodes["energy"].abs())
    nodes["effect"] = effect.fillna(0.0)
    classes = {int(c["unit"]): c for c in circuit.meta.get("classes", [])}
    by_layer = nodes.groupby("layer", sort=False)
    # one column per layer, its units top-down by effect
    nodes["x"] = nodes["layer"].map({layer: i for i, layer in enumerate(layers)}) \
        .astype("int64")
    rank = by_layer["effect"].rank(ascending=False, method="first")
    nodes["y"] = (1 - (rank - 0.5) / by_layer["layer"].transform("size")).astype("float64")
    top = by_layer["effect"].transform("max").clip(lower=1e-12)
    nodes["size"] = 0.15 + 0.85 * np.sqrt(nodes["effect"] / top)
    nodes["label"] = [_label(r.kind, int(r.unit), classes) for r in nodes.itertuples()]
    pos = {(r.layer, int(r.unit)): (r.x, r.y) for r in nodes.itertuples()}
    edges, shown, total = _strongest(circuit.edges, edge_mass, max_edges)
    return {"nodes": nodes, "layers": layers, "pos": pos, "edges": edges,
            "shown_mass": shown, "total": total, "edge_mass": edge_mass}


def _strongest(edges: pd.DataFrame, mass: float, max_edges: int):
    """The fewest edges of each layer pair holding ``mass`` of its |score|, capped at
    ``max_edges`` in all; (edges, share of all |score| they hold, edges in all)."""
    if edges.empty:
        return edges, 1.0, 0
    e = edges.assign(mag=edges["score"].abs().fillna(0.0))
    keep = []
    pairs = e.groupby(["src_layer", "dst_layer"], sort=False)
    per = max(1, max_edges // max(1, pairs.ngroups))
    for _, g in pairs:
        g = g.sort_values("mag", ascending=False)
        cum = g["mag"].cumsum() / max(1e-12, float(g["mag"].sum()))
        n = min(per, int((cum < mass).sum()) + 1)
        top = float(g["mag"].iloc[0]) or 1.0
        keep.append(g.head(n).assign(width=lambda d, t=top: 0.3 + 3.2 * d["mag"] / t))
    out = pd.concat(keep)
    return out, float(out["mag"].sum() / max(1e-12, e["mag"].sum())), len(edges)


def _edge_colour(score: float) -> str:
    return "#c0392b" if score < 0 else "#2e6fb7"


def _caption(lay: dict) -> str:
    return (f"edges: the strongest {len(lay['edges'])} of {lay['total']} (each layer pair's "
            f"top {100 * lay['edge_mass']:.0f} % of |score|, capped), "
            f"{100 * lay['shown_mass']:.0f} % of all |score|")


def _title(circuit) -> str:
    m = circuit.meta
    extra = ""
    if "search_fraction" in m:
        extra = (f" - {100 * m['search_fraction']:.0f} % of the tapped units keep "
                 f"{m['search_contrast']:.2f} of the contrast")
    return f"{m.get('model', '')}: {m.get('label', '')} ({m.get('read_on', '')}){extra}"


def plot(circuit, path: Union[str, os.PathLike, None] = None, ax=None, title=None,
         max_edges: int = 300, edge_mass: float = 0.8):
    """The layered drawing (module docstring). Writes PNG or SVG (by suffix) atomically when
    ``path`` is given; returns the axes."""
    import matplotlib
    if path is not None and ax is None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection
    from matplotlib.lines import Line2D
    lay = layout(circuit, edge_mass, max_edges)
    nodes, pos = lay["nodes"], lay["pos"]
    own = ax is None
    if own:
        tall = max(1, int(nodes.groupby("layer").size().max()))
        fig, ax = plt.subplots(figsize=(2.6 * max(2, len(lay["layers"])),
                                        min(14, 2.5 + 0.18 * tall)))
    ends = [(pos.get((r.src_layer, int(r.src_unit))), pos.get((r.dst_layer, int(r.dst_unit))), r)
            for r in lay["edges"].itertuples()]
    ends = [(a, b, r) for a, b, r in ends if a and b]
    if ends:   # one artist for every edge: drawn as one line each was, in a fraction of the time
        ax.add_collection(LineCollection(
            [(a, b) for a, b, _ in ends], colors=[_edge_colour(r.score) for *_, r in ends],
            linewidths=[r.width for *_, r in ends], alpha=0.45, zorder=1,
            linestyles=[":" if r.kind == "effective" else "-" for *_, r in ends]))
    for kind, g in nodes.groupby("kind", sort=False):
        colour, marker = KIND_STYLE.get(kind, ("#999999", "o"))
        ax.scatter(g["x"], g["y"], s=30 + 320 * g["size"] ** 2, c=colour, marker=marker,
                   edgecolors="k", linewidths=0.5, zorder=2)
    # every label where a column has room, else its 12 strongest units
    rank = nodes.groupby("layer")["effect"].rank(ascending=False, method="first")
    room = nodes.groupby("layer")["layer"].transform("size") <= 40
    for r in nodes[room | (rank <= 12) | (nodes["kind"] == "class")].itertuples():
        ax.annotate(r.label, (r.x, r.y), xytext=(6, 0), textcoords="offset points",
                    fontsize=6 if r.kind != "class" else 8, va="center", zorder=3)
    ax.set_xticks(range(len(lay["layers"])), [_short(n) for n in lay["layers"]], rotation=20,
                  fontsize=8, ha="right")
    ax.set_yticks([])
    ax.set_xlim(-0.5, len(lay["layers"]) - 0.2)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    handles = [Line2D([], [], marker=KIND_STYLE[k][1], color="w", markerfacecolor=KIND_STYLE[k][0],
                      markeredgecolor="k", markersize=7, label=k)
               for k in KIND_STYLE if k in set(nodes["kind"])]
    handles += [Line2D([], [], color=_edge_colour(1), lw=2, label="edge: adds to the score"),
                Line2D([], [], color=_edge_colour(-1), lw=2, label="edge: takes from it")]
    ax.legend(handles=handles, fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0),
              title="node area ~ effect\nedge width ~ |score|", title_fontsize=6)
    ax.set_title(title or _title(circuit), fontsize=9)
    ax.text(0, -0.06, _caption(lay), transform=ax.transAxes, fontsize=6, color="#555")
    if own and path is not None:
        fig.tight_layout()
        fmt = Path(path).suffix.lstrip(".") or "png"
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=110)
        plt.close(fig)
        write_atomic(path, lambda f: f.write(buf.getvalue()))
    return ax


def _png_uri(img: np.ndarray) -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).resize(
        (64, 64), Image.NEAREST).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@torch.no_grad()
def unit_crops(hm: HookedModel, x: torch.Tensor, circuit) -> dict:
    """{(layer, unit): PNG data URI}: the patch of ``x`` around where each unit of the
    circuit is most active (a quarter of the image on a side, centred on the argmax of its
    map); units without a spatial map get the whole image."""
    from ..preprocessing import denormalize
    units = circuit.units
    _, cache = hm.run_with_cache(x, names=[n for n, u in units.items() if u])
    img = denormalize(x[:1], hm.data_config).clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy()
    H, W = img.shape[:2]
    side = max(8, min(H, W) // 4)
    out = {}
    for layer, us in units.items():
        if not us:
            continue
        act = cache[layer]
        a = hm.point(layer).per_unit(act)[0]                     # (U, P)
        spatial = act.dim() == 4 and hm.point(layer).unit_axis == 1
        h, w = (act.shape[2], act.shape[3]) if spatial else (1, 1)
        for u in us:
            if not spatial:
                out[(layer, u)] = _png_uri(img)
                continue
            p = int(a[u].argmax())
            cy, cx = int((p // w + 0.5) * H / h), int((p % w + 0.5) * W / w)
            y0, x0 = max(0, min(H - side, cy - side // 2)), max(0, min(W - side, cx - side // 2))
            out[(layer, u)] = _png_uri(img[y0:y0 + side, x0:x0 + side])
    return out


_READY = """<script>
window.addEventListener('load', function () { setTimeout(function () {
  var n = (window.Bokeh && Bokeh.documents) ? Bokeh.documents.length : 0;
  document.body.setAttribute('data-circuit-view', n > 0 ? 'ready' : 'failed');
}, 500); });
</script>"""


def to_html(circuit, path: Union[str, os.PathLike], crops: Optional[dict] = None,
            max_edges: int = 300, edge_mass: float = 0.8) -> Path:
    """The interactive view (module docstring), one self-contained file written atomically."""
    from bokeh.embed import file_html
    from bokeh.models import ColumnDataSource, HoverTool, Legend, LegendItem
    from bokeh.plotting import figure
    from bokeh.resources import INLINE
    lay = layout(circuit, edge_mass, max_edges)
    nodes, pos = lay["nodes"], lay["pos"]
    crops = crops or {}
    fig = figure(width=max(700, 230 * len(lay["layers"])), height=700, title=_title(circuit),
                 tools="pan,wheel_zoom,box_zoom,reset,save", toolbar_location="above",
                 x_range=(-0.6, len(lay["layers"]) - 0.2))
    e = lay["edges"]
    if len(e):
        ab = [(pos.get((r.src_layer, int(r.src_unit))), pos.get((r.dst_layer, int(r.dst_unit))))
              for r in e.itertuples()]
        ok = [a is not None and b is not None for a, b in ab]
        es = ColumnDataSource({
            "xs": [[a[0], b[0]] for (a, b), k in zip(ab, ok) if k],
            "ys": [[a[1], b[1]] for (a, b), k in zip(ab, ok) if k],
            "w": e["width"][ok].tolist(),
            "c": [_edge_colour(s) for s in e["score"][ok]]})
        fig.multi_line("xs", "ys", line_width="w", line_color="c", line_alpha=0.45, source=es)
    items = []
    for kind, g in nodes.groupby("kind", sort=False):
        colour, _ = KIND_STYLE.get(kind, ("#999999", "o"))
        src = ColumnDataSource({
            "x": g["x"].tolist(), "y": g["y"].tolist(), "r": (8 + 18 * g["size"]).tolist(),
            "label": g["label"].tolist(), "layer": g["layer"].tolist(),
            "unit": g["unit"].astype(int).tolist(), "effect": g["effect"].tolist(),
            "energy": g["energy"].tolist(),
            "crop": [crops.get((r.layer, int(r.unit)), "") for r in g.itertuples()]})
        rend = fig.scatter("x", "y", size="r", fill_color=colour, line_color="black",
                           source=src, marker="square" if kind == "class" else "circle")
        items.append(LegendItem(label=kind, renderers=[rend]))
        if kind == "class":                  # classes by name and probability, always shown
            fig.text("x", "y", text="label", source=src, x_offset=14, text_font_size="9pt",
                     text_baseline="middle")
    fig.add_tools(HoverTool(tooltips="""<div><b>@label</b> &middot; @layer, unit @unit<br>
        effect @effect{0.000} &middot; energy @energy{0.00}<br>
        <img src="@crop" width="96" height="96" style="image-rendering:pixelated"
             onerror="this.style.display='none'"></div>""",
        renderers=[r for it in items for r in it.renderers]))
    fig.add_layout(Legend(items=items, location="top_left"), "right")
    fig.xaxis.ticker = list(range(len(lay["layers"])))
    fig.xaxis.major_label_overrides = {i: _short(n) for i, n in enumerate(lay["layers"])}
    fig.yaxis.visible = False
    fig.xgrid.visible = fig.ygrid.visible = False
    fig.below[0].axis_label = _caption(lay)
    page = file_html(fig, resources=INLINE, title=_title(circuit))
    page = page.replace("</body>", _READY + "</body>", 1)
    write_text(path, page)
    return Path(path)
