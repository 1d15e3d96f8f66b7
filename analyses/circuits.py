"""How faithful are circuits? Keep-only, removal and random-circuit tests over circuit size.

    python analyses/circuits.py --out analyses/out/circuits            # ~1 h on 2 CPU cores
    python analyses/circuits.py --out /tmp/c --quick                   # synthetic CNN, 1 image

For each model and image, circuits are read on the image and on its minimal explanation (the
paper's premise) with three selections at the same sizes (a fraction of all tapped units):
``energy`` (||phi_c||_2, the paper) and ``attribution`` (|phi_c x d logit / d phi_c|), both top
fraction of every layer, and ``learned`` (gates optimised under mean ablation, the budget
shared across layers). Each circuit is then tested on the image under mean ablation over
reference images: keep only the circuit, remove only the circuit, and random circuits of the
same size per layer. Reported: the target logit kept (fraction of the clean logit, and
normalised between "everything ablated" (0) and "clean" (1)), the image-vs-reference contrast
kept (the honest one: mean ablation lets a circuit keep one image's logit without reading
the image), top-1 kept, whether removing the circuit flips top-1.

Writes ``circuits.csv`` (every row), ``circuits.md`` (means over images) and
``faithfulness.png`` (contrast kept vs circuit size, random circuits dashed).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (arguments, cl, fail, gather, pyplot, save_figure, start,  # noqa: E402
                     write_summary)
from circuitlab.circuits import Circuit, faithfulness, read_circuit  # noqa: E402
from circuitlab.circuits.circuit import UNIT_KINDS  # noqa: E402
from circuitlab.explain import explain  # noqa: E402
from circuitlab.files import write_text  # noqa: E402

BUDGETS = (0.05, 0.10, 0.20)
OUTPUTS = ("circuits.csv", "circuits.md", "faithfulness.png")


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


def _subset(full: Circuit, score: str, budget: float, hm) -> Circuit:
    """The top ``budget`` of every layer of a full nodes-only readout, by ``score``."""
    nodes = full.nodes[full.nodes["kind"].isin(UNIT_KINDS)]
    keep = []
    for layer, g in nodes.groupby("layer", sort=False):
        n = max(1, round(budget * hm.n_units(layer)))
        keep.append(g.sort_values(score, ascending=False).head(n))
    return Circuit(pd.concat(keep), full.edges.iloc[:0], dict(full.meta))


def _row(val: pd.DataFrame) -> dict:
    keep = val[val["test"] == "keep"].iloc[0]
    rem = val[val["test"] == "remove"].iloc[0]
    rnd = val[val["test"] == "random_keep"]
    return {"units": int(keep["units"]), "keep_logit": keep["logit_fraction"],
            "keep_normalized": keep["logit_normalized"],
            "keep_contrast": keep["contrast_fraction"], "keep_top1": bool(keep["top1_kept"]),
            "remove_flips_top1": not bool(rem["top1_kept"]),
            "remove_normalized": rem["logit_normalized"],
            "random_normalized": rnd["logit_normalized"].mean(),
            "random_contrast": rnd["contrast_fraction"].mean(),
            "random_top1": rnd["top1_kept"].astype(float).mean()}


def analyse(name, hm, images, refs, budgets, steps, seed=0, log=print,
            learned_on=("image", "explanation")):
    rows = []
    layers_total = None
    for image, x in images.items():
        t0 = time.perf_counter()
        ex = explain(hm, x, seed=seed)
        target = int(hm(x).argmax(-1))
        for read_on, inp in (("image", None), ("explanation", ex.explanation)):
            full = read_circuit(hm, x, inp, select_by="energy", k=10 ** 6, edges="none")
            layers_total = sum(hm.n_units(layer) for layer in full.units)
            circuits = []
            for b in budgets:
                for score in ("energy", "attribution"):
                    circuits.append((score, b, _subset(full, score, b, hm)))
                if read_on not in learned_on:
                    continue
                try:
                    circuits.append(("learned", b, read_circuit(
                        hm, x, inp, select_by="learned", budget=b, reference=refs,
                        edges="none", steps=steps, target=target)))
                except cl.CircuitlabError as e:   # e.g. no contrast to the references
                    log(f"{name} {image} learned {b}: skipped ({e})")
            for select, b, c in circuits:
                val = faithfulness(hm, x, c, method="mean", reference=refs, n_random=4,
                                   seed=seed)
                rows.append({"model": name, "image": image, "label": hm.label(target),
                             "read_on": read_on, "select": select, "budget": b,
                             "tapped_units": layers_total, **_row(val)})
        log(f"{name} {image}: {time.perf_counter() - t0:.0f} s")
    return rows


def summary(df: pd.DataFrame) -> pd.DataFrame:
    agg = df.groupby(["model", "read_on", "select", "budget"], sort=False).agg(
        images=("image", "count"), units=("units", "mean"),
        keep_logit=("keep_logit", "mean"), keep_normalized=("keep_normalized", "mean"),
        keep_contrast=("keep_contrast", "mean"), keep_top1=("keep_top1", "mean"),
        remove_flips=("remove_flips_top1", "mean"),
        random_normalized=("random_normalized", "mean"),
        random_contrast=("random_contrast", "mean"), random_top1=("random_top1", "mean"))
    return agg.reset_index()


def plot(df: pd.DataFrame, path: Path):
    plt = pyplot()
    s = summary(df)
    ms = list(dict.fromkeys(s["model"]))
    fig, axes = plt.subplots(1, len(ms), figsize=(4.2 * len(ms), 3.4), squeeze=False)
    for ax, m in zip(axes[0], ms):
        sm = s[s["model"] == m]
        for (read_on, select), g in sm.groupby(["read_on", "select"], sort=False):
            ax.plot(g["budget"] * 100, g["keep_contrast"], marker="o",
                    ls="-" if read_on == "image" else ":", label=f"{select} ({read_on})")
        rnd = sm.groupby("budget")["random_contrast"].mean()
        ax.plot(rnd.index * 100, rnd.values, "k--", label="random")
        ax.axhline(0.8, color="grey", lw=0.5)
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("% of tapped units kept")
        ax.set_ylabel("image-vs-reference contrast kept")
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> int:
    p = arguments(__doc__, "synthetic CNN, one image, 10 %% only", MODELS, images=3,
                  images_help="images per model (at most 3)",
                  gather="circuits.md and faithfulness.png from --out/circuits.csv")
    p.add_argument("--steps", type=int, default=300, help="learned selection steps")
    p.add_argument("--learned-on", choices=["image", "explanation", "both"], default="both",
                   help="where the learned selection runs (it is the slow part)")
    args = p.parse_args(argv)
    out = Path(args.out)
    prog = "analyses/circuits.py"
    if args.gather:
        return gather(prog, out, "circuits.csv", write_outputs)
    rows = []
    budgets = BUDGETS[1:2] if args.quick else BUDGETS
    steps = 20 if args.quick else args.steps
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(names) - set(MODELS))
    if unknown or not 1 <= args.images <= 3:
        return fail(prog, f"models are {', '.join(MODELS)} and --images is 1 to 3")
    learned_on = ("image", "explanation") if args.learned_on == "both" else (args.learned_on,)
    stop = start(prog, out, OUTPUTS, args.force)
    if stop is not None:
        return stop
    for name, hm, images, refs in models(args.quick, names, args.images):
        rows += analyse(name, hm, images, refs, budgets, steps, learned_on=learned_on)
        # after every model, so a long run that stops keeps what it measured
        write_text(out / "circuits.csv", pd.DataFrame(rows).to_csv(index=False))
    return write_outputs(pd.DataFrame(rows), out)


def write_outputs(df: pd.DataFrame, out: Path) -> int:
    plot(df, out / "faithfulness.png")
    return write_summary(
        out, "circuits", "Circuit faithfulness (mean ablation, target = the image's top-1)",
        "keep_* : only the circuit's units stay (every other unit of the tapped layers "
        "mean-ablated). keep_logit = z / z_clean; keep_normalized = (z - z_all_ablated) / "
        "(z_clean - z_all_ablated); keep_contrast = (z(image) - mean z(references)) under "
        "the same ablation over the clean network's: the image-specific evidence kept (0 "
        "for a circuit that ignores its input, which can still keep z on one image). "
        "remove_flips: removing only the circuit changes top-1. random_*: random circuits "
        "of the same size per layer (4 draws). units: mean circuit size; budget: fraction "
        "of all tapped units.", summary(df))


if __name__ == "__main__":
    sys.exit(main())
