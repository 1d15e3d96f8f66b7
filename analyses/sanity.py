"""Model-parameter randomisation test (Adebayo et al. 2018): explanations must change when
the weights they explain do.

    python analyses/sanity.py --out analyses/out/sanity           # ~10 min on 2 CPU cores
    python analyses/sanity.py --out /tmp/sanity --quick           # ~1 min

Cascading randomisation from the top: stage k re-draws every parameter of the k deepest
parameterised stages (classifier first, then the blocks down to the stem) from a normal
with each tensor's own mean and standard deviation, on a copy of the model. At every stage
each method explains the randomised model's own top-1 on the same images; the map is
compared with the trained model's by Spearman rank correlation and by the IoU of the top
10 % of pixels. A method that passes falls towards 0 as more of the network is randomised;
one that stays high is reading the image (an edge detector), not the model.

Writes ``sanity.csv`` (one row per image, method, stage), ``sanity.md`` (means) and
``sanity.png`` (rank correlation against the number of randomised stages).
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pandas as pd
import torch

from circuitlab import baselines
from circuitlab.explain import explain
from circuitlab.files import write_text

from _common import (QUICK_STEPS, arguments, bad_models, cl, fail, gather, load,
                     parse_list, pyplot, save_figure, settings, start, write_summary)

PROG = "analyses/sanity.py"
MODELS = ("synthetic-cnn", "synthetic-vit", "efficientnet_lite0")
OUTPUTS = ("sanity.csv", "sanity.md", "sanity.png")


def stages(model: torch.nn.Module) -> list[str]:
    """Parameterised top-level stages, deepest first (blocks of a ViT / EfficientNet count
    one by one)."""
    names = []
    for name, child in model.named_children():
        if not any(True for _ in child.parameters()):
            continue
        if name == "blocks":
            for sub, block in child.named_children():
                if any(True for _ in block.parameters()):
                    names.append(f"blocks.{sub}")
        else:
            names.append(name)
    return names[::-1]


@torch.no_grad()
def randomise(model: torch.nn.Module, path: str, g: torch.Generator) -> None:
    for p in model.get_submodule(path).parameters():
        mean, std = p.float().mean(), p.float().std() if p.numel() > 1 else torch.tensor(1.0)
        p.copy_(mean + std * torch.randn(p.shape, generator=g).to(p))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    # float64: in float32 the sums of squared ranks round, and identical maps scored 1.000002
    ra = a.flatten().argsort().argsort().double()
    rb = b.flatten().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


def maps(hm, x, methods, quick):
    kw = settings(quick)
    out = {}
    for m in methods:
        if m == "ours":
            out[m] = explain(hm, x, steps=QUICK_STEPS if quick else None).ranking().cpu()
        else:
            extra = dict(kw.get(m, {}), **({"area": 0.1} if m == "extremal" else {}))
            out[m] = baselines.saliency(hm, x, m, **extra)
    return out


def analyse(name, hm, x, quick, log=print):
    methods = ["ours"] + baselines.methods_for(hm)
    base = maps(hm, x, methods, quick)
    order = stages(hm.model)
    if quick:
        order = order[:2]
    g = torch.Generator().manual_seed(0)
    model = copy.deepcopy(hm.model)
    rows = []
    for k, path in enumerate(order, 1):
        randomise(model, path, g)
        rhm = cl.load_model(model, data_config=hm.data_config, labels=hm.labels)
        now = maps(rhm, x, methods, quick)
        for m in methods:
            top_a = baselines.binarize_at_area(base[m], 0.1) > 0.5
            top_b = baselines.binarize_at_area(now[m], 0.1) > 0.5
            for i in range(x.shape[0]):
                inter = (top_a[i] & top_b[i]).sum().item()
                union = (top_a[i] | top_b[i]).sum().item()
                rows.append({"model": name, "stage": k, "randomised": path, "method": m,
                             "image": i, "spearman": spearman(base[m][i], now[m][i]),
                             "top10_iou": inter / max(1, union)})
        log(f"{name}: stage {k} ({path}) done")
    return rows


def summary(df: pd.DataFrame) -> pd.DataFrame:
    return df.groupby(["model", "stage", "randomised", "method"], sort=False)[
        ["spearman", "top10_iou"]].mean().reset_index()


def plot(df: pd.DataFrame, path: Path):
    plt = pyplot()
    s = summary(df)
    ms = list(dict.fromkeys(s["model"]))
    fig, axes = plt.subplots(1, len(ms), figsize=(4.4 * len(ms), 3.4), squeeze=False)
    for ax, m in zip(axes[0], ms):
        sm = s[s["model"] == m]
        for method, g in sm.groupby("method", sort=False):
            ax.plot(g["stage"], g["spearman"], marker="o", lw=2 if method == "ours" else 1,
                    label=method)
        ax.set_xticks(list(sm["stage"].unique()))
        ax.set_xticklabels(list(dict.fromkeys(sm["randomised"])), rotation=60, fontsize=6)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_ylim(-0.3, 1.0)
        ax.set_title(f"{m}: randomised from the top", fontsize=9)
        ax.set_ylabel("rank correlation with the trained model's map")
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> int:
    p = arguments(__doc__, "synthetic CNN, 2 images, 2 stages", MODELS,
                  "synthetic-cnn,synthetic-vit", 8,
                  gather="sanity.md and sanity.png from --out/sanity.csv")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.gather:
        return gather(PROG, out, "sanity.csv", write_outputs)
    names = ["synthetic-cnn"] if args.quick else parse_list(args.models)
    bad = bad_models(PROG, names, MODELS)
    if bad is not None:
        return bad
    if args.images < 1:
        return fail(PROG, "--images must be positive")
    stop = start(PROG, out, OUTPUTS, args.force, args.quick)
    if stop is not None:
        return stop
    rows = []
    n = 2 if args.quick else args.images
    for name in names:
        hm, x, _, _ = load(name, n)
        rows += analyse(name, hm, x, args.quick)
        write_text(out / "sanity.csv", pd.DataFrame(rows).to_csv(index=False))
    return write_outputs(pd.DataFrame(rows), out)


def write_outputs(df: pd.DataFrame, out: Path) -> int:
    plot(df, out / "sanity.png")
    return write_summary(
        out, "sanity", "Model-parameter randomisation (cascading, from the top)",
        "spearman: rank correlation between the trained and the randomised model's maps "
        "(each explaining its own top-1); top10_iou: overlap of their top 10 % pixels. "
        "Lower after randomisation = the method depends on the weights (it passes).",
        summary(df))


if __name__ == "__main__":
    sys.exit(main())
