"""The paper's figures, reproduced: explanations with the ``paper`` preset on the bundled
photos beside Grad-CAM and our ``default`` preset, with the numbers the paper gives in prose.

    python analyses/paper_figures.py --out analyses/out/paper_figures  # 880 steps, ~75 min
    python analyses/paper_figures.py --out /tmp/pf --quick                  # ~1 min

The paper (Suhail, Anand and Sethi 2025) shows single examples and states in prose: about
5 % of the pixels kept (ResNet-18, EntleBucher: confidence 0.26 -> 0.53), about 2 % (otter),
and confidence that rises on the explanation (EfficientNet, zucchini 0.59 -> 0.89). Only
EfficientNet-Lite0 has real weights offline here, so its photos stand in: for each, the
kept area, p_target on the image and on the explanation, top-1 kept, necessity drop (the
complement alone) and time per image are measured for both presets.

Writes ``paper_figures.csv``, ``paper_figures.md`` and ``paper_figures.png`` (image,
Grad-CAM, paper-preset explanation, default-preset explanation per photo).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from circuitlab import baselines, metrics
from circuitlab.explain import explain
from circuitlab.explain.config import preset
from circuitlab.files import write_text

from _common import (PHOTOS, arguments, cl, fail, faded, pyplot, save_figure,
                     show_image, start, write_summary)

PROG = "analyses/paper_figures.py"
OUTPUTS = ("paper_figures.csv", "paper_figures.md", "paper_figures.png")
PAPER_PROSE = ("The paper: about 5 % of pixels kept (ResNet-18 EntleBucher, confidence 0.26 -> "
               "0.53), about 2 % (otter); EfficientNet zucchini 0.59 -> 0.89; ConvNeXt granny "
               "smith 0.10 -> 0.62; MobileNet jackfruit 0.62 -> 0.92; ViT charger 0.28 -> 0.91. "
               "No aggregate, no runtime, no necessity measured.")


def run(hm, x, name, preset_name, steps):
    cfg = preset(preset_name, hm.family.name, x.shape[-1])
    if steps:
        cfg = cfg.replace(steps=steps, min_steps=min(cfg.min_steps, steps),
                          patience=min(cfg.patience, steps))
    ex = explain(hm, x, cfg)
    ev = metrics.evaluate_mask(hm, x, ex.mask, n_random=2)
    y = int(ev["label"][0])
    return ex, {"photo": name, "label": hm.label(y), "preset": preset_name,
                "steps": ex.steps, "area": float(ev["area_fraction"][0]),
                "confidence_image": float(ev["confidence_image"][0]),
                "confidence_explanation": float(ev["confidence_explanation"][0]),
                "top1": bool(ev["top1_kept"][0]), "sufficiency": float(ev["sufficiency"][0]),
                "necessity": float(ev["necessity_drop"][0]), "seconds": ex.seconds}


def main(argv=None) -> int:
    p = arguments(__doc__, "one photo, 3 paper / 5 default steps (a smoke run)", images=5,
                  images_help=f"photos (at most {len(PHOTOS)})")
    p.add_argument("--steps", type=int, default=None,
                   help="override the paper preset's 880 steps (say so when you report)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if not 1 <= args.images <= len(PHOTOS):
        return fail(PROG, f"--images is 1 to {len(PHOTOS)}")
    if args.steps is not None and args.steps < 1:
        return fail(PROG, "--steps must be positive")
    stop = start(PROG, out, OUTPUTS, args.force, args.quick)
    if stop is not None:
        return stop
    hm = cl.load_model("efficientnet_lite0")
    photos = PHOTOS[:1 if args.quick else args.images]
    paper_steps = 3 if args.quick else args.steps
    rows, shown = [], []
    for name in photos:
        x = cl.data.load_image(name, hm)
        cam = baselines.grad_cam(hm, x)
        ex_p, row_p = run(hm, x, name, "paper", paper_steps)
        ex_d, row_d = run(hm, x, name, "default", 5 if args.quick else None)
        rows += [row_p, row_d]
        shown.append((name, x, cam, ex_p.mask.cpu(), ex_d.mask.cpu(), row_p, row_d))
        print(f"{name}: paper area {row_p['area']:.3f} conf {row_p['confidence_image']:.2f} -> "
              f"{row_p['confidence_explanation']:.2f} ({row_p['seconds']:.0f} s); default "
              f"area {row_d['area']:.3f} -> {row_d['confidence_explanation']:.2f}", flush=True)
        write_text(out / "paper_figures.csv", pd.DataFrame(rows).to_csv(index=False))
    plot(hm, shown, out / "paper_figures.png")
    return write_summary(
        out, "paper_figures",
        "The paper's examples, measured (EfficientNet-Lite0, real ImageNet weights)",
        PAPER_PROSE + "\n\narea: kept fraction of the pixels; confidence: p_target on the "
        "image and on the explanation (masked pixels at the normalisation mean); necessity: "
        "relative drop of p_target when only the complement is shown; seconds: per image "
        "on this machine.", pd.DataFrame(rows))

def plot(hm, shown, path: Path):
    plt = pyplot()
    fig, axes = plt.subplots(len(shown), 4, figsize=(8, 2.1 * len(shown)), squeeze=False)
    for r, (name, x, cam, mp, md, rp, rd) in enumerate(shown):
        img = show_image(x, hm)
        axes[r][0].imshow(img)
        axes[r][0].set_title(f"{name}: {rp['label']} ({rp['confidence_image']:.2f})", fontsize=7)
        axes[r][1].imshow(img)
        axes[r][1].imshow(cam[0, 0].numpy(), cmap="jet", alpha=0.45)
        axes[r][1].set_title("Grad-CAM", fontsize=7)
        for c, (m, row) in enumerate(((mp, rp), (md, rd)), 2):
            axes[r][c].imshow(faded(img, m[0, 0].numpy()))
            axes[r][c].set_title(f"{row['preset']}: {row['area']:.0%} kept, "
                                 f"{row['confidence_explanation']:.2f}", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
