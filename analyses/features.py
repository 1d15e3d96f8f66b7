"""Circuits in a feature basis against circuits of channels: the same frontier, the same
images, the same models.

    python analyses/features.py --out analyses/out/features          # ~30 min on 2 CPU cores
    python analyses/features.py --out /tmp/f --quick                 # synthetic CNN, 1 image

Per model, a top-k sparse dictionary on every tapped layer (``circuitlab.features``: ``--size``
x the layer's units features, ``--k`` active per position) is trained on the activations of
images the frontier does not test: the synthetic benchmark's stream for the synthetic models,
random crops and flips of the offline photos for Lite0 (so its dictionaries have seen other
crops of the tested photos: say so when reading its row). Then for each image the frontier
(``circuits.frontier``, mean ablation over reference images that are never the image) runs
twice: nodes = the layers' channels, and nodes = dictionary features plus one error node
per layer. Reported: the share of all nodes a circuit needs for 50 % and 80 % of the
image-vs-reference contrast with top-1 kept, and in absolute node counts.

Writes ``features.csv``, ``features.md``, ``features.png`` and the dictionaries
(``dictionaries_<model>.pt``, reused by a later run in the same folder).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pandas as pd
import torch

from circuitlab import features as F
from circuitlab.circuits import frontier, smallest

from _common import (arguments, cl, fail, gather, images_and_references,
                     parse_list, pyplot, save_figure, start, write_as_they_come,
                     write_summary)

MODELS = ("synthetic-cnn", "synthetic-resnet18", "efficientnet_lite0")
FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8)
OUTPUTS = ("features.csv", "features.md", "features.png")


def training_images(name: str, hm, n: int) -> torch.Tensor:
    if name.startswith("synthetic"):
        return cl.synthetic.make_dataset(n, seed=5).normalized()
    import torchvision.transforms.v2 as T
    size = hm.input_size[1:]
    aug = T.Compose([T.RandomResizedCrop(size, scale=(0.2, 1.0)), T.RandomHorizontalFlip()])
    photos = torch.cat([cl.data.load_image(p, hm) for p in cl.data.available_samples()])
    torch.manual_seed(0)
    return torch.stack([aug(photos[i % len(photos)]) for i in range(n)])


def dictionaries(name: str, hm, out: Path, args, log=print) -> dict:
    path = out / f"dictionaries_{name}.pt"
    if path.is_file():
        return F.load_dictionaries(path, hm)
    t = time.perf_counter()
    imgs = training_images(name, hm, 64 if args.quick else (2000 if name.startswith(
        "synthetic") else 256))
    d = F.train_dictionaries(hm, hm.taps, imgs, size=args.size, k=args.k, steps=args.steps,
                             log=lambda s: log(f"{name} {s}"))
    F.save_dictionaries(path, hm, d)
    log(f"{name}: dictionaries in {time.perf_counter() - t:.0f} s")
    return d


def analyse(name: str, hm, dicts: dict, n: int, fractions, done=(), log=print):
    for image, (x, refs) in images_and_references(name, hm, n).items():
        if image in done:
            continue
        t0 = time.perf_counter()
        parts = []
        for basis, d in (("channels", None), ("features", dicts)):
            try:
                df = frontier(hm, x, hm.taps, refs, fractions=fractions, basis=d,
                              rankings=("iterative", "attribution", "random"))
            except cl.CircuitlabError as e:
                log(f"{name} {image}: skipped ({e})")
                break
            parts.append(df.assign(basis=basis))
        else:
            df = pd.concat(parts)
            df.insert(0, "image", image)
            df.insert(0, "model", name)
            df["seconds"] = time.perf_counter() - t0
            log(f"{name} {image}: {df['seconds'].iloc[0]:.0f} s")
            yield df.to_dict("records")


def headline(df: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (model, basis), g in df.groupby(["model", "basis"], sort=False):
        total = int(g["total"].iloc[0])
        row = {"model": model, "nodes": f"{basis} ({total})"}
        for level in (0.5, 0.8):
            need = smallest(g.drop(columns="basis"), level)
            it = need[(need["ranking"] == "iterative") & (need["ablation"] == "mean")]
            got = it[it.columns[-1]].dropna()
            row[f"size {int(100 * level)} %"] = (
                f"{100 * got.median():g} % ({round(got.median() * total)} nodes), "
                f"{len(got)}/{len(it)}" if len(got) else f"> 80 %, 0/{len(it)}")
        at10 = g[(g["ranking"] == "iterative") & (g["fraction"] == 0.1)]["contrast"]
        rnd10 = g[(g["ranking"] == "random") & (g["fraction"] == 0.1)]["contrast"]
        row["contrast at 10 %"] = f"{at10.mean():.2f} [{at10.min():.2f}-{at10.max():.2f}]"
        row["random at 10 %"] = f"{rnd10.mean():.2f}"
        rows.append(row)
    return pd.DataFrame(rows)


def plot(df: pd.DataFrame, path: Path):
    plt = pyplot()
    ms = list(dict.fromkeys(df["model"]))
    fig, axes = plt.subplots(1, len(ms), figsize=(4.2 * len(ms), 3.4), squeeze=False)
    for ax, m in zip(axes[0], ms):
        for (basis, r), g in df[df["model"] == m].groupby(["basis", "ranking"], sort=False):
            mean = g.groupby("fraction")["contrast"].mean()
            ax.plot(mean.index * 100, mean.values, marker="o", ms=3, label=f"{basis}, {r}",
                    ls="-" if basis == "features" else "--")
        ax.axhline(0.8, color="grey", lw=0.5)
        ax.set_xscale("log")
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("% of the nodes kept")
        ax.set_ylabel("contrast kept (mean ablation)")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, path)


def write_outputs(df: pd.DataFrame, out: Path) -> int:
    plot(df, out / "features.png")
    n = df.groupby("model")["image"].nunique()
    return write_summary(
        out, "features", "Circuits of dictionary features against circuits of channels",
        "Iterative attribution ranking, mean ablation of every other node over reference "
        "images; nodes = the tapped layers' channels, or their dictionary features plus one "
        "error node per layer. size = the smallest share of the nodes keeping 50 % / 80 % "
        "of the image-vs-reference contrast with top-1 kept (median over images, images "
        "that reached it); contrast at 10 %: mean [min-max]. Images per model: "
        + ", ".join(f"{m} {k}" for m, k in n.items()) + ".", headline(df))


def main(argv=None) -> int:
    p = arguments(__doc__, "synthetic CNN, one image, a small dictionary", MODELS,
                  default_models="synthetic-cnn,synthetic-resnet18", images=5,
                  gather="features.md and features.png from --out/features.csv")
    p.add_argument("--size", type=int, default=4, help="features per unit of a layer")
    p.add_argument("--k", type=int, default=4, help="active features per position")
    p.add_argument("--steps", type=int, default=1500, help="dictionary training steps")
    args = p.parse_args(argv)
    out = Path(args.out)
    prog = "analyses/features.py"
    if args.gather:
        return gather(prog, out, "features.csv", write_outputs)
    names = parse_list(args.models)
    if not names or set(names) - set(MODELS) or args.images < 1 or args.size < 1 or \
            args.k < 1 or args.steps < 10:
        return fail(prog, f"models are {', '.join(MODELS)}; --images, --size, --k at least 1;"
                          f" --steps at least 10")
    fractions = FRACTIONS
    if args.quick:
        names, args.images, args.steps, fractions = ["synthetic-cnn"], 1, 100, (0.1, 0.4, 1.0)
    stop = start(prog, out, OUTPUTS, args.force or args.resume, args.quick)
    if stop is not None:
        return stop
    models = {name: cl.load_model(name) for name in names}
    rows = write_as_they_come(out / "features.csv", models, lambda name, hm, done: analyse(
        name, hm, dictionaries(name, hm, out, args), args.images, fractions, done),
        resume=args.resume)
    if not rows:
        return fail(prog, "no image could be read (see the lines above)")
    return write_outputs(pd.DataFrame(rows), out)


if __name__ == "__main__":
    sys.exit(main())
