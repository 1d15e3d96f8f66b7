"""The circuit frontier: how much of the decision circuits of each size keep, for every way of
choosing them, across model families.

    python analyses/circuits.py --out analyses/out/circuits            # ~1 h on 2 CPU cores
    python analyses/circuits.py --out /tmp/c --quick                   # synthetic CNN, 1 image

For each model and image, circuits of 5-80 % of all tapped units are chosen by every
selection of ``circuitlab.circuits.frontier`` (energy, the paper's score; attribution
patching; iterative attribution patching, the default readout's order; EAP-IG; random; and
learned gates, on the first ``--learned-images`` images of each model) and kept under mean and resample ablation of every other tapped unit, over reference
images that are never the image itself. Reported: the share of the image-vs-reference
contrast kept (references under the same ablation) and whether top-1 stays.

Headline per model: the smallest circuit keeping 50 % and 80 % of the contrast with top-1
kept, per image, as the median over images with its range and n.

Writes ``frontier.csv`` (every row, after every image), ``circuits.md`` (headline and mean
contrast per size), ``frontier.png``, and the default readout of the last model's first image
drawn as ``example_circuit.png`` and ``example_circuit.html`` (interactive).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pandas as pd

from circuitlab.circuits import frontier, read_circuit, smallest
from circuitlab.circuits.drawing import unit_crops
from circuitlab.circuits.readout import node_layers
from circuitlab.files import write_text

from _common import (arguments, cl, fail, gather, images_and_references,
                     markdown, parse_list, pyplot, save_figure, start, write_as_they_come)

FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
RANKINGS = ("energy", "attribution", "iterative", "eap-ig", "random", "learned")
OUTPUTS = ("frontier.csv", "circuits.md", "frontier.png", "example_circuit.png",
           "example_circuit.html")
SYNTHETIC = ("synthetic-cnn", "synthetic-vit", "synthetic-resnet18", "synthetic-convnext",
             "synthetic-mobilenetv3")
REAL = ("efficientnet_lite0", "efficientnet_lite1")
MODELS = SYNTHETIC + REAL


def analyse(name: str, hm, n: int, rankings, fractions, steps: int, learned_images: int,
            done=(), log=print):
    """The frontier rows of each image in turn but those ``done``; the learned selection (the
    slow one) on the first ``learned_images`` only."""
    layers = node_layers(hm)
    for k, (image, (x, refs)) in enumerate(images_and_references(name, hm, n).items()):
        if image in done:
            continue
        t0 = time.perf_counter()
        chosen = [r for r in rankings if r != "learned" or k < learned_images]
        try:
            df = frontier(hm, x, layers, refs, fractions=fractions, rankings=chosen,
                          ablations=("mean", "resample"), learned_steps=steps)
        except cl.CircuitlabError as e:     # e.g. the references outscore the image
            log(f"{name} {image}: skipped ({e})")
            continue
        df.insert(0, "image", image)
        df.insert(0, "model", name)
        df["label"] = hm.label(int(df["target"].iloc[0]))
        df["seconds"] = time.perf_counter() - t0
        log(f"{name} {image}: {df['seconds'].iloc[0]:.0f} s")
        yield df.to_dict("records")


def example(hm, x, refs, out: Path) -> None:
    """The default readout of one image, drawn (PNG and interactive HTML)."""
    c = read_circuit(hm, x, reference=refs)
    c.plot(out / "example_circuit.png")
    c.to_html(out / "example_circuit.html", crops=unit_crops(hm, x, c))


def headline(df: pd.DataFrame) -> pd.DataFrame:
    """Per model, selection and ablation: the size needed for 50 % and 80 % of the contrast
    (median over images [min-max], images that reached it / images)."""
    out = []
    for level in (0.5, 0.8):
        need = smallest(df, level)
        col = need.columns[-1]
        for key, g in need.groupby(["model", "ranking", "ablation"], sort=False):
            got = g[col].dropna()
            cell = (f"{100 * got.median():.0f} % [{100 * got.min():.0f}-"
                    f"{100 * got.max():.0f}]" if len(got) else "> 80 %")
            out.append({"model": key[0], "selection": key[1], "ablation": key[2],
                        "level": level, "size": cell, "reached": f"{len(got)}/{len(g)}"})
    t = pd.DataFrame(out)
    wide = t.pivot_table(index=["model", "selection", "ablation"], columns="level",
                         values=["size", "reached"], aggfunc="first", sort=False)
    wide.columns = [f"{a} {int(100 * b)} %" for a, b in wide.columns]
    return wide.reset_index()


def curves(df: pd.DataFrame) -> pd.DataFrame:
    """Mean contrast kept per model, selection, ablation and size."""
    t = df.groupby(["model", "ranking", "ablation", "fraction"], sort=False)["contrast"] \
        .mean().unstack("fraction")
    t.columns = [f"{100 * c:g} %" for c in t.columns]
    return t.reset_index().rename(columns={"ranking": "selection"})


def plot(df: pd.DataFrame, path: Path):
    plt = pyplot()
    ms = list(dict.fromkeys(df["model"]))
    cols = min(4, len(ms))
    rows = -(-len(ms) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.3 * rows), squeeze=False)
    for ax, m in zip(axes.flat, ms):
        g = df[(df["model"] == m) & (df["ablation"] == "mean")]
        for r, gr in g.groupby("ranking", sort=False):
            mean = gr.groupby("fraction")["contrast"].mean()
            ax.plot(mean.index * 100, mean.values, marker="o", ms=3, label=r,
                    ls="--" if r == "random" else "-", color="k" if r == "random" else None)
        ax.axhline(0.8, color="grey", lw=0.5)
        ax.set_ylim(-0.1, 1.1)
        ax.set_title(f"{m} (n={g['image'].nunique()})", fontsize=9)
        ax.set_xlabel("% of tapped units kept")
        ax.set_ylabel("contrast kept (mean ablation)")
    for ax in list(axes.flat)[len(ms):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, path)


def write_outputs(df: pd.DataFrame, out: Path) -> int:
    plot(df, out / "frontier.png")
    head, curve = headline(df), curves(df)
    n = df.groupby("model")["image"].nunique()
    write_text(out / "circuits.md", "\n".join([
        "# The circuit frontier: contrast kept against circuit size", "",
        "Every tapped unit outside the circuit is ablated (mean: the reference mean per "
        "position; resample: one reference image's value, 4 draws averaged); contrast = "
        "(z(image) - mean z(references)) under that ablation over the clean network's, "
        "references never the image. size = the smallest circuit (share of all tapped units) "
        "keeping 50 % / 80 % of the contrast with top-1 kept: median over images "
        "[min-max]; reached = images where some size up to 80 % did. Images per model: "
        + ", ".join(f"{m} {k}" for m, k in n.items()) + ".", "",
        "## Size needed", "", markdown(head), "",
        "## Mean contrast kept per circuit size", "", markdown(curve), ""]))
    with pd.option_context("display.width", 200, "display.max_rows", 500):
        print(head.to_string(index=False))
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    p = arguments(__doc__, "synthetic CNN, one image, three sizes", MODELS, images=8,
                  images_help="images per model (photos: at most the offline samples)",
                  gather="circuits.md and frontier.png from --out/frontier.csv")
    p.add_argument("--rankings", default=",".join(RANKINGS),
                   help="comma-separated, of " + ", ".join(RANKINGS))
    p.add_argument("--learned-steps", type=int, default=100,
                   help="optimisation steps of the learned selection at each size")
    p.add_argument("--learned-images", type=int, default=3,
                   help="images per model that the learned selection runs on (the slow part)")
    args = p.parse_args(argv)
    out = Path(args.out)
    prog = "analyses/circuits.py"
    if args.gather:
        return gather(prog, out, "frontier.csv", write_outputs)
    names = parse_list(args.models)
    rankings = parse_list(args.rankings)
    if not names or set(names) - set(MODELS) or set(rankings) - set(RANKINGS) or \
            not rankings or args.images < 1 or args.learned_steps < 10:
        return fail(prog, f"models are {', '.join(MODELS)}; rankings {', '.join(RANKINGS)}; "
                          f"--images at least 1; --learned-steps at least 10")
    fractions = FRACTIONS
    if args.quick:
        names, fractions, args.images, args.learned_steps = ["synthetic-cnn"], \
            (0.2, 0.6, 0.8), 1, 10
    stop = start(prog, out, OUTPUTS, args.force or args.resume, args.quick)
    if stop is not None:
        return stop
    models = {name: cl.load_model(name) for name in names}
    rows = write_as_they_come(out / "frontier.csv", models, lambda name, hm, done: analyse(
        name, hm, args.images, rankings, fractions, args.learned_steps, args.learned_images, done),
        resume=args.resume)
    if not rows:
        return fail(prog, "no image could be read (see the lines above)")
    hm = models[names[-1]]
    example(hm, *next(iter(images_and_references(names[-1], hm, 1).values())), out)
    return write_outputs(pd.DataFrame(rows), out)


if __name__ == "__main__":
    sys.exit(main())
