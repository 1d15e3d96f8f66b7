"""Can a sparse circuit exist? How many units each tapped layer needs on its own.

    python analyses/units_needed.py --out analyses/out/units_needed     # ~5 min on 2 CPU cores
    python analyses/units_needed.py --out /tmp/u --quick                # synthetic CNN, 1 image

For each model, image and tapped layer, keep the top f of that layer's units (ranked by
attribution |phi x d logit / d phi| on the image, or by its mean-ablation version
(phi - mean phi_ref) x d logit / d phi), mean-ablate the rest of that layer and
leave every other layer intact (``circuits.units_needed``). A layer "needs" the smallest f
that keeps 80 % of the target logit and top-1. The layers' needs, weighted by their sizes,
give the budget a circuit would need even if the ablations of different layers did not
compound: when it is far above 10 %, no selection of 10 % of the tapped units (energy,
attribution or learned) can keep 80 % of the logit, whatever the readout.

Writes ``units_needed.csv`` (every curve point), ``units_needed.md`` (per model and layer:
the fraction needed, mean and range over images, and the size-weighted budget) and
``units_needed.png`` (logit kept against the fraction of the one layer kept, mean-delta
ranking).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import torch

from circuitlab.circuits import units_needed
from circuitlab.circuits.readout import node_layers
from circuitlab.files import write_text

from _common import (arguments, cl, fail, gather, pyplot, save_figure,
                     start, write_summary)

PROG = "analyses/units_needed.py"
OUTPUTS = ("units_needed.csv", "units_needed.md", "units_needed.png")
THRESHOLD = 0.8


def rankings(hm, x, refs, layers, target):
    """{ranking: {layer: units best first}}: ``attribution`` |sum phi * g| (the readout's) and
    ``mean-delta`` sum (phi - mean phi_ref) * g, attribution patching against the mean
    ablation (signed: the units whose removal costs the most first). The second is exact
    for a layer read linearly by the logit (the last conv before pool and classifier)."""
    _, rc = hm.run_with_cache(refs, names=layers)
    _, c = hm.run_with_cache(x, names=layers, grads=True, target=target)
    out = {"attribution": {}, "mean-delta": {}}
    for layer in layers:
        hp = hm.point(layer)
        a, g = hp.per_unit(c[layer])[0], hp.per_unit(c.grad(layer))[0]
        d = hp.per_unit(c[layer] - rc[layer].mean(0, keepdim=True))[0]
        out["attribution"][layer] = (a * g).sum(-1).abs().argsort(descending=True).tolist()
        out["mean-delta"][layer] = (d * g).sum(-1).argsort(descending=True).tolist()
    return out


def analyse(name, hm, images, refs) -> list[pd.DataFrame]:
    frames = []
    for image, x in images.items():
        layers = node_layers(hm)                   # read_circuit's default layers
        target = int(hm(x).argmax(-1))
        for rank, order in rankings(hm, x, refs, layers, target).items():
            df = units_needed(hm, x, order, threshold=THRESHOLD, ablation="mean",
                              reference=refs, target=target)
            for col, val in (("ranking", rank), ("image", image), ("model", name)):
                df.insert(0, col, val)
            df["layer_units"] = df["layer"].map(hm.n_units)
            frames.append(df)
        print(f"{name} {image}: done", flush=True)
    return frames


def needed(df: pd.DataFrame) -> pd.DataFrame:
    """Per model, image and layer: the smallest fraction that meets the threshold (1.0 when
    even the whole layer is needed, which it always meets)."""
    keys = ["model", "ranking", "image", "layer"]
    met = df[df["meets"]].groupby(keys, sort=False).agg(fraction=("fraction", "min"))
    units = df.groupby(keys, sort=False)["layer_units"].first()
    return met.join(units, how="right").fillna({"fraction": 1.0}).reset_index()


def summary(df: pd.DataFrame) -> pd.DataFrame:
    n = needed(df)
    per_layer = n.groupby(["model", "ranking", "layer"], sort=False).agg(
        units=("layer_units", "first"), images=("image", "count"),
        needed_mean=("fraction", "mean"), needed_min=("fraction", "min"),
        needed_max=("fraction", "max")).reset_index()
    n["weighted"] = n["fraction"] * n["layer_units"]
    budget = n.groupby(["model", "ranking", "image"], sort=False).agg(
        w=("weighted", "sum"), u=("layer_units", "sum"))
    budget = (budget["w"] / budget["u"]).groupby(level=[0, 1], sort=False)
    rows = [{"model": m, "ranking": r, "layer": "all (size-weighted)",
             "units": int(g["units"].sum()), "images": int(g["images"].max()),
             "needed_mean": float(budget.mean()[(m, r)]),
             "needed_min": float(budget.min()[(m, r)]),
             "needed_max": float(budget.max()[(m, r)])}
            for (m, r), g in per_layer.groupby(["model", "ranking"], sort=False)]
    return pd.concat([per_layer, pd.DataFrame(rows)]).sort_values(
        ["model", "ranking"], kind="stable").reset_index(drop=True)


def plot(df: pd.DataFrame, path: Path) -> None:
    plt = pyplot()
    ms = list(dict.fromkeys(df["model"]))
    fig, axes = plt.subplots(1, len(ms), figsize=(4.2 * len(ms), 3.4), squeeze=False)
    for ax, m in zip(axes[0], ms):
        g = df[(df["model"] == m) & (df["ranking"] == "mean-delta")].groupby(
            ["layer", "fraction"], sort=False)["logit_fraction"].mean().reset_index()
        for layer, c in g.groupby("layer", sort=False):
            ax.plot(c["fraction"] * 100, c["logit_fraction"], marker=".", label=layer)
        ax.axhline(THRESHOLD, color="grey", lw=0.5)
        ax.axvline(10, color="grey", lw=0.5, ls=":")
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("% of the one layer kept (rest of it mean-ablated)")
        ax.set_ylabel("target logit kept")
        ax.legend(fontsize=5)
    fig.tight_layout()
    save_figure(fig, path)


def write_outputs(df: pd.DataFrame, out: Path) -> int:
    plot(df, out / "units_needed.png")
    return write_summary(
        out, "units_needed", "Units each tapped layer needs on its own",
        f"One layer at a time: its top units kept (ranked by attribution |sum phi g| or by "
        f"mean-delta sum (phi - mean phi_ref) g, attribution patching against the mean "
        f"ablation, exact where the logit reads the layer linearly), the rest of that layer "
        f"mean-ablated over reference images, every other layer intact. needed = the "
        f"smallest fraction of the layer that keeps {THRESHOLD:.0%} of the target logit and "
        f"top-1 (grid 2, 5, 10, 20, 30, 40, 60, 80, 100 %), mean / min / max over images. "
        f"'all (size-weighted)': the layers' needs weighted by their unit counts, the budget "
        f"a circuit would need even if ablations in different layers did not compound.",
        summary(df))


MODELS = ("synthetic-cnn", "synthetic-vit", "efficientnet_lite0")


def models(quick: bool, names=MODELS, n_images: int = 3):
    """(name, HookedModel, {image name: x}, reference batch) per model."""
    if quick:
        hm = cl.synthetic.synthetic_model("cnn", log=None)      # trained once, then cached
        d = cl.synthetic.make_dataset(9, seed=123).normalized()
        yield "synthetic-cnn", hm, {"synthetic:0": d[:1]}, d[1:]
        return
    test = cl.synthetic.make_dataset(n_images, seed=123).normalized()
    refs = cl.synthetic.make_dataset(32, seed=7).normalized()
    for kind in ("cnn", "vit"):
        if f"synthetic-{kind}" not in names:
            continue
        hm = cl.synthetic.synthetic_model(kind, log=None)
        yield f"synthetic-{kind}", hm, {f"synthetic:{i}": test[i:i + 1]
                                        for i in range(n_images)}, refs
    if "efficientnet_lite0" not in names:
        return
    hm = cl.load_model("efficientnet_lite0")
    photos = ("coffee", "chelsea", "rocket")[:n_images]
    others = [s for s in cl.data.available_samples() if s not in ("coffee", "chelsea", "rocket")]
    refs = torch.cat([cl.data.load_image(s, hm) for s in others])
    yield "efficientnet_lite0", hm, {p: cl.data.load_image(p, hm) for p in photos}, refs


def main(argv=None) -> int:
    p = arguments(__doc__, "synthetic CNN, one image", MODELS, images=3,
                  images_help="images per model (at most 3)",
                  gather="the table and figure from --out/units_needed.csv")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.gather:
        return gather(PROG, out, "units_needed.csv", write_outputs)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    if sorted(set(names) - set(MODELS)) or not 1 <= args.images <= 3:
        return fail(PROG, f"models are {', '.join(MODELS)} and --images is 1 to 3")
    stop = start(PROG, out, OUTPUTS, args.force, args.quick)
    if stop is not None:
        return stop
    frames = []
    for name, hm, images, refs in models(args.quick, names, args.images):
        frames += analyse(name, hm, images, refs)
        write_text(out / "units_needed.csv", pd.concat(frames).to_csv(index=False))
    return write_outputs(pd.concat(frames), out)


if __name__ == "__main__":
    sys.exit(main())
