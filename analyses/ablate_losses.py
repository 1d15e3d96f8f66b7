"""What each loss term buys: leave-one-out over the explanation objective.

    python analyses/ablate_losses.py --out analyses/out/ablate_losses    # ~5 min, 2 CPU cores
    python analyses/ablate_losses.py --out /tmp/al --quick               # ~30 s

For each term of the default preset (activation matching, CE, KL, area, binarisation, TV,
necessity) and the paper's robustness term (off in the default), the per-image explanation
is rerun with that weight set to 0 (``rob``: set to the paper's 100 instead; ``act x
paper``: activation matching at the paper's weight relative to CE, 10:15) on the same
images of the ground-truth benchmark, and scored: kept area, top-1 kept, confidence,
sufficiency, necessity drop, and against the planted object: pointing game, mask precision,
IoU. The paper reports these ablations as pictures only (activation matching alone keeps
nearly the whole image; TV removes noise; heavy area + TV shrink the mask).

What activation matching buys downstream: each explanation's circuit is read on e (the
paper's readout, ``read_circuit(hm, x, explanation=e)``) and compared with the image's own
circuit read on x: ``circuit_jaccard`` (units shared / units in either), ``image_recall``
(share of the image's circuit units the explanation's circuit holds), and validated on x:
``circuit_contrast``, the share of x's contrast with 32 reference images that keeping only
the explanation's circuit keeps (mean ablation of every other unit).

Writes ``ablate_losses.csv`` (one row per image and variant), ``ablate_losses.md`` (means)
and ``ablate_losses.png`` (one example image's mask per variant).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from circuitlab import metrics
from circuitlab.circuits import faithfulness, read_circuit
from circuitlab.explain import explain
from circuitlab.explain.config import preset
from circuitlab.files import write_text

from _common import (arguments, bad_models, cl, fail, faded, parse_list,
                     pyplot, save_figure, show_image, start, synthetic_images,
                     write_summary)

PROG = "analyses/ablate_losses.py"
MODELS = ("synthetic-cnn", "synthetic-vit")
TERMS = ("act", "ce", "kl", "area", "bin", "tv", "nec")
OUTPUTS = ("ablate_losses.csv", "ablate_losses.md", "ablate_losses.png")


def variants(base) -> dict:
    out = {"full": base}
    for t in TERMS:
        out[f"-{t}"] = base.replace(**{t: 0.0})
    out["+rob"] = base.replace(rob=100.0 * base.ce / 15.0)   # the paper's rob:CE ratio
    out["act x paper"] = base.replace(act=10.0 * base.ce / 15.0)  # the paper's act:CE ratio
    out["only act+area+bin+tv"] = base.replace(ce=0.0, kl=0.0, nec=0.0)
    return out


def circuit_agreement(hm, x, e, image_circuit, refs) -> dict:
    """The explanation's circuit (read on ``e``) against the image's, and validated on x."""
    nan = float("nan")
    try:
        c = read_circuit(hm, x, explanation=e, reference=refs)
    except cl.CircuitlabError:      # e.g. the references outscore the explanation
        return {"circuit_jaccard": nan, "image_recall": nan, "circuit_contrast": nan}
    where = c.diff(image_circuit)["in"]           # both / self (e only) / other (x only)
    both = int((where == "both").sum())
    keep = faithfulness(hm, x, c, reference=refs, n_random=0).set_index("test").loc["keep"]
    return {"circuit_jaccard": both / max(1, len(where)),
            "image_recall": both / max(1, both + int((where == "other").sum())),
            "circuit_contrast": float(keep["contrast_fraction"])}


def analyse(name, hm, x, gt, refs, log=print, steps=None):
    rows, masks = [], {}
    base = preset("default", hm.family.name, x.shape[-1])
    if steps:
        base = base.replace(steps=steps, min_steps=min(base.min_steps, steps))
    own = [read_circuit(hm, x[i:i + 1], reference=refs) for i in range(x.shape[0])]
    for label, cfg in variants(base).items():
        ex = explain(hm, x, cfg)
        ev = metrics.evaluate_mask(hm, x, ex.mask)
        pg = metrics.pointing_game(ex.soft, gt)
        prec, iou = metrics.mask_precision(ex.mask, gt), metrics.iou(ex.mask, gt)
        masks[label] = ex.mask.cpu()
        for i in range(x.shape[0]):
            rows.append({"model": name, "variant": label, "image": i,
                         "area": float(ev["area_fraction"][i]),
                         "top1": bool(ev["top1_kept"][i]),
                         "confidence": float(ev["confidence_explanation"][i]),
                         "sufficiency": float(ev["sufficiency"][i]),
                         "necessity": float(ev["necessity_drop"][i]),
                         "pointing": float(pg[i]), "precision": float(prec[i]),
                         "iou": float(iou[i]), "seconds": ex.seconds / x.shape[0],
                         **circuit_agreement(hm, x[i:i + 1], ex.explanation[i:i + 1], own[i],
                                             refs)})
        log(f"{name} {label}: area {float(ev['area_fraction'].mean()):.3f}")
    return rows, masks


def summary(df: pd.DataFrame) -> pd.DataFrame:
    d = df.assign(top1=df["top1"].astype(float))
    cols = ["area", "top1", "confidence", "sufficiency", "necessity", "pointing", "precision",
            "iou", "circuit_jaccard", "image_recall", "circuit_contrast", "seconds"]
    return d.groupby(["model", "variant"], sort=False)[cols].mean().reset_index()


def plot(examples: dict, path: Path):
    plt = pyplot()
    models = list(examples)
    labels = list(next(iter(examples.values()))[2])
    fig, axes = plt.subplots(len(models), len(labels) + 1,
                             figsize=(1.5 * (len(labels) + 1), 1.7 * len(models)), squeeze=False)
    for r, name in enumerate(models):
        hm, x, masks = examples[name]
        img = show_image(x[:1], hm)
        axes[r][0].imshow(img)
        axes[r][0].set_title(name, fontsize=6)
        for c, label in enumerate(labels, 1):
            m = masks[label][0, 0].numpy()
            axes[r][c].imshow(faded(img, m))
            axes[r][c].set_title(f"{label}\n{m.mean():.0%}", fontsize=6)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> int:
    p = arguments(__doc__, "synthetic CNN, 4 images, 20 steps", MODELS, images=32)
    args = p.parse_args(argv)
    out = Path(args.out)
    names = ["synthetic-cnn"] if args.quick else parse_list(args.models)
    bad = bad_models(PROG, names, MODELS)
    if bad is not None:
        return bad
    if args.images < 1:
        return fail(PROG, "--images must be positive")
    stop = start(PROG, out, OUTPUTS, args.force, args.quick)
    if stop is not None:
        return stop
    rows, examples = [], {}
    n = 4 if args.quick else args.images
    for name in names:
        hm = cl.synthetic.synthetic_model(name.split("-")[1], log=None)
        x, gt, _ = synthetic_images(n)
        refs = cl.synthetic.make_dataset(32, seed=7).normalized()   # never the test images
        r, masks = analyse(name, hm, x, gt, refs, steps=20 if args.quick else None)
        rows += r
        examples[name] = (hm, x, masks)
        write_text(out / "ablate_losses.csv", pd.DataFrame(rows).to_csv(index=False))
    plot(examples, out / "ablate_losses.png")
    return write_summary(
        out, "ablate_losses", "Leave-one-out over the loss terms (synthetic benchmark)",
        "full: the default preset. -t: term t's weight set to 0. +rob: the paper's "
        "robustness term added. act x paper: activation matching at the paper's weight "
        "relative to CE (10:15). only act+area+bin+tv: no class terms at all (CE, KL, "
        "necessity off): what activation matching alone keeps. area: kept fraction; "
        "pointing / precision / iou against the planted object. circuit_jaccard / "
        "image_recall: units the explanation's circuit (read on e) shares with the image's "
        "(read on x); circuit_contrast: the share of x's contrast with 32 reference images "
        "that the explanation's circuit alone keeps on x.", summary(pd.DataFrame(rows)))


if __name__ == "__main__":
    sys.exit(main())
