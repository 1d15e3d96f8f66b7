"""What every analysis script shares: output-folder rules, Markdown tables, figures, data."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd
import torch

import circuitlab as cl
from circuitlab.files import make_folder, refuse_overwrite, write_atomic, write_text

# distinct photos (scikit-image's "cat" is chelsea again)
PHOTOS = ("coffee", "chelsea", "rocket", "astronaut", "flower", "grace_hopper")
QUICK_STEPS = 20    # explanation steps under --quick (a smoke run, not a result)


def fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def refuse_clash(prog: str, out: Path, outputs: Sequence[str], force: bool) -> Optional[int]:
    """Exit status 2 with one line when an output exists and --force was not given."""
    try:
        refuse_overwrite([out / f for f in outputs], force)
    except cl.CircuitlabError as e:
        return fail(prog, str(e))
    return None


def bad_models(prog: str, names: Sequence[str], allowed: Sequence[str]) -> Optional[int]:
    """Exit status 2 with one line when --models is empty or names an unknown model."""
    if not names or sorted(set(names) - set(allowed)):
        return fail(prog, f"--models are {', '.join(allowed)}")
    return None


def arguments(doc: str, quick: str, models: Optional[Sequence[str]] = None,
              default_models: Optional[str] = None, images: Optional[int] = None,
              images_help: str = "images per model",
              gather: Optional[str] = None) -> argparse.ArgumentParser:
    """The options every analysis shares: --out, --quick, --models, --images, --force and,
    where the outputs can be rebuilt from a CSV, --gather (``gather`` says what from) and
    --resume."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--quick", action="store_true", help=quick)
    if models is not None:
        p.add_argument("--models", default=default_models or ",".join(models),
                       help="comma-separated, of " + ", ".join(models))
    p.add_argument("--images", type=int, default=images, help=images_help)
    p.add_argument("--force", action="store_true", help="replace existing outputs")
    if gather:
        p.add_argument("--gather", action="store_true", help=f"only rebuild {gather}")
        p.add_argument("--resume", action="store_true",
                       help="keep the rows already in --out's CSV, measure only the images "
                            "it lacks, then rebuild every output from all rows")
    return p


QUICK_NOTE = ("A --quick smoke run (few images, few steps): these numbers check that the "
              "analysis runs; they are not results. docs/results.md holds the measured ones.")


def start(prog: str, out: Path, outputs: Sequence[str], force: bool,
          quick: bool = False) -> Optional[int]:
    """Refuse to replace outputs (exit status 2), else quiet warnings, seed torch and create
    the output folder, marking a --quick run's as such (WARNING.txt, which the report shows
    above the section); None means go on."""
    refused = refuse_clash(prog, out, outputs, force)
    if refused is not None:
        return refused
    try:
        make_folder(out)
    except cl.CircuitlabError as e:
        return fail(prog, str(e))
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    if quick:
        write_text(out / "WARNING.txt", QUICK_NOTE + "\n")
    else:
        (out / "WARNING.txt").unlink(missing_ok=True)
    return None


def gather(prog: str, out: Path, csv_name: str, write_outputs) -> int:
    """--gather: rebuild tables and figures from the CSV an earlier run wrote."""
    path = out / csv_name
    if not path.is_file():
        return fail(prog, f"{path} does not exist; run without --gather first")
    return write_outputs(pd.read_csv(path), out)


def write_summary(out: Path, stem: str, title: str, caption: str, table: pd.DataFrame,
                  width: int = 200) -> int:
    """``stem.md`` (title, caption, the table) written atomically; the table printed."""
    write_text(out / f"{stem}.md", "\n".join([f"# {title}", "", caption, "", markdown(table)])
               + "\n")
    with pd.option_context("display.width", width, "display.float_format", "{:.2f}".format):
        print(table.to_string(index=False))
    print(f"wrote {out}")
    return 0


def markdown(df: pd.DataFrame) -> str:
    """A Markdown table (floats to 2 decimals) without the optional tabulate package."""
    def cell(v):
        if isinstance(v, float):
            return "" if v != v else f"{v:.2f}"
        return str(v)
    lines = ["| " + " | ".join(df.columns) + " |", "|" + " --- |" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """Write atomically: a reader never sees half a PNG."""
    plt = pyplot()
    write_atomic(path, lambda f: fig.savefig(f, dpi=dpi, format="png"))
    plt.close(fig)


def show_image(x: torch.Tensor, hm) -> "object":
    """(1, C, H, W) normalised -> (H, W, C) numpy in [0, 1] for imshow."""
    return cl.data.denormalize(x, hm).clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy()


def synthetic_images(n: int, seed: int = 123):
    """The ground-truth benchmark's held-out images (normalised) and object masks."""
    d = cl.synthetic.make_dataset(n, seed=seed)
    return d.normalized(), d.masks, d.labels


def parse_list(text: str, kind=str) -> list:
    return [kind(t.strip()) for t in text.split(",") if t.strip()]


def faded(img, mask):
    """Kept pixels as they are, the rest faded to grey: how a mask reads at a glance."""
    m = mask[..., None]
    return img * m + (0.5 + 0.2 * (img - 0.5)) * (1 - m)


def images_and_references(name: str, hm, n: int) -> dict:
    """{image name: (x, references)} for the circuit analyses: ``n`` held-out benchmark
    images against 32 others for the synthetic models, else ``n`` of the offline photos,
    each against all the other photos (never itself)."""
    if name.startswith("synthetic"):
        test = cl.synthetic.make_dataset(n, seed=123).normalized()
        refs = cl.synthetic.make_dataset(32, seed=7).normalized()
        return {f"synthetic:{i}": (test[i:i + 1], refs) for i in range(n)}
    photos = cl.data.available_samples()
    xs = {p: cl.data.load_image(p, hm) for p in photos}
    return {p: (xs[p], torch.cat([xs[o] for o in photos if o != p])) for p in photos[:n]}


def write_as_they_come(path: Path, models: dict, batches_of, resume: bool = False) -> list:
    """Every row of ``batches_of(name, hm, done)`` (lists of row dicts, one per image) for each
    of ``models`` ({name: HookedModel}), the CSV at ``path`` rewritten after each batch so that
    a run that stops keeps what it measured. ``resume``: the rows already in ``path`` are kept
    and ``done`` holds their images per model, for ``batches_of`` to skip."""
    rows = pd.read_csv(path).to_dict("records") if resume and path.is_file() else []
    for name, hm in models.items():
        done = {r["image"] for r in rows if r["model"] == name}
        for got in batches_of(name, hm, done):
            rows += got
            write_text(path, pd.DataFrame(rows).to_csv(index=False))
    return rows


def settings(quick: bool) -> dict:
    """Keyword arguments per method (the paper defaults, fewer samples under --quick)."""
    return {"ig": {"steps": 8 if quick else 32}, "rise": {"n_masks": 200 if quick else 2000},
            "extremal": {"steps": 100 if quick else 800}}


def load(name: str, n_images: int):
    """(HookedModel, x, ground-truth masks or None, image names)."""
    if name.startswith("synthetic-"):
        hm = cl.synthetic.synthetic_model(name.split("-")[1], log=None)
        x, gt, _ = synthetic_images(n_images)
        return hm, x, gt, [f"synthetic:{i}" for i in range(n_images)]
    hm = cl.load_model(name)
    photos = PHOTOS[:n_images]
    return hm, torch.cat([cl.data.load_image(p, hm) for p in photos]), None, list(photos)
