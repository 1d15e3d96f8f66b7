"""What every command shares: the model and image flags, output flags, argparse ``type=``
validators (a bad value is one line and exit 2 before anything loads), model loading and
output."""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import sys
from pathlib import Path

from ..errors import CircuitlabError
from ..files import make_folder, write_atomic

SEED_MAX = 2 ** 63 - 1      # torch.manual_seed's range


# ---------------------------------------------------------------------------- validators
def _number(kind, text: str, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def _validator(kind, what: str, ok, rule: str, name: str):
    """An argparse ``type=``: ``text`` parsed as ``kind`` and held to ``ok``, else one line
    ("--steps must be at least 1, got 0")."""
    def check(text: str):
        value = _number(kind, text, what)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{rule}, got {text}")
        return value
    check.__name__ = name
    return check


positive_int = _validator(int, "a whole number", lambda v: v >= 1, "must be at least 1",
                          "positive_int")
count = _validator(int, "a whole number", lambda v: v >= 0, "must be 0 or more", "count")
seed = _validator(int, "a whole number", lambda v: 0 <= v <= SEED_MAX,
                  "must lie in 0 .. 2**63 - 1", "seed")
# a fraction strictly between 0 and 1 (an area, a share of units or of a contrast)
fraction = _validator(float, "a number", lambda v: 0 < v < 1, "must lie in (0, 1)", "fraction")
# a ratio to the image's confidence
ratio = _validator(float, "a number", lambda v: v >= 0, "must be 0 or more", "ratio")


# ---------------------------------------------------------------------------- flags
def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default="efficientnet_lite0",
                   help="model name (see `circuitlab models`), any timm / torchvision name, or "
                        "a circuitlab checkpoint file (default: efficientnet_lite0)")
    p.add_argument("--checkpoint", help="state_dict file to load into --model "
                                        "(read with weights_only=True)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda")
    p.add_argument("--random-weights", "--no-pretrained", dest="random_weights",
                   action="store_true",
                   help="build a hub name with random weights on purpose (a name whose "
                        "weights cannot be loaded is refused otherwise)")


# the ablations circuitlab.interventions.ABLATIONS declares (literal here so that --help
# needs no torch; a test holds the two equal)
ABLATIONS = ("zero", "mean", "resample")


class _RenamedFlag(argparse.Action):
    """An old flag name, accepted for one release with one warning line."""

    def __init__(self, *args, new: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"circuitlab: warning: {option_string} is now {self.new}; the old name goes in "
              f"the next release", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_ablation(p: argparse.ArgumentParser, help: str) -> None:
    """--ablation (and its old name --method, which also named the saliency method)."""
    p.add_argument("--ablation", choices=ABLATIONS, default="mean", help=help)
    p.add_argument("--method", dest="ablation", choices=ABLATIONS, action=_RenamedFlag,
                   new="--ablation", help=argparse.SUPPRESS)


def add_image_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", "-i", default="coffee",
                   help="image file, folder, or sample name (default: coffee)")


def add_outputs(p: argparse.ArgumentParser, out_help: str, force_help: str) -> None:
    """--out, --force and --json, as every writing command has them."""
    p.add_argument("--out", "-o", required=True, help=out_help)
    p.add_argument("--force", action="store_true", help=force_help)
    add_json(p)


def add_reference(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reference", help="folder of images for mean / resample ablation, or "
                                       "'synthetic' (default: the offline sample photos)")


def add_batch_args(p: argparse.ArgumentParser) -> None:
    """How a folder run goes: images per batch, decoding processes."""
    p.add_argument("--batch-size", type=positive_int, default=4,
                   help="folder runs: images optimised together (default 4); each keeps its "
                        "own mask, early stop and result")
    p.add_argument("--workers", type=count, default=None,
                   help="folder runs: processes decoding images (default: half the cores, "
                        "at most 4)")


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--progress", action="store_true",
                   help="progress bars on stderr even with --json (shown on a terminal "
                        "otherwise)")


def bars_on(args) -> bool:
    """Progress bars: on a terminal, quiet under --json unless --progress."""
    return not getattr(args, "json", False) or getattr(args, "progress", False)


def add_seed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=seed, default=0, help="random seed (default 0)")


# ---------------------------------------------------------------------------- running
def load(args):
    """The model the flags name."""
    from ..zoo import load_model
    return load_model(args.model, checkpoint=args.checkpoint, device=args.device,
                      pretrained=False if args.random_weights else None)


def target_index(hm, target):
    """--target as a class index: an index, or a label of the model (exact, then unique
    case-insensitive prefix); None stays None (the top-1)."""
    from ..errors import did_you_mean
    if target is None:
        return None
    n = len(hm.labels) if hm.labels else None
    if target.isdigit():
        if n is not None and int(target) >= n:
            raise CircuitlabError(f"--target {target}: {hm.name} has classes 0 .. {n - 1}")
        return int(target)
    labels = [str(label) for label in hm.labels or []]
    if target in labels:
        return labels.index(target)
    hits = [i for i, label in enumerate(labels) if label.lower().startswith(target.lower())]
    if len(hits) == 1:
        return hits[0]
    raise CircuitlabError(f"--target {target!r} is no class of {hm.name}"
                          f"{' (several labels start so)' if hits else ''}."
                          f"{did_you_mean(target, labels)} Give a label or a class index")


def provenance(args, hm) -> dict:
    """How a result was made, for its metrics.json: seed, threads, device, versions (masks
    differ between thread counts by float rounding)."""
    from importlib.metadata import version

    import torch

    from .. import __version__
    return {"seed": getattr(args, "seed", None), "threads": torch.get_num_threads(),
            "device": str(hm.device), "versions": {
                "circuitlab": __version__, "torch": torch.__version__,
                "timm": version("timm"), "nnsight": version("nnsight"),
                "python": platform.python_version()}}


@contextlib.contextmanager
def steps_bar(desc: str, total: int, show: bool = True):
    """A progress bar over optimisation steps on stderr (shown on a terminal only); yields
    the callback ``(step, *_)`` that moves it."""
    from tqdm.auto import tqdm
    with tqdm(total=total, desc=desc, unit="step", file=sys.stderr,
              disable=None if show else True, leave=False) as bar:
        yield lambda step, *_: bar.update(step - bar.n)


def emit(args, payload, table) -> None:
    """``payload`` as JSON with --json, else the human-readable ``table``."""
    if args.json:
        json.dump(payload, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(table)


def save_png(path: Path, array) -> None:
    from PIL import Image

    write_atomic(path, lambda f: Image.fromarray(array).save(f, format="PNG"))


def overlay(rgb, m):
    """The image with what ``m`` (H, W, 1) does not keep dimmed, as 8-bit RGB."""
    import numpy as np
    return (rgb * (0.25 + 0.75 * m) * 255).round().astype(np.uint8)


def save_mask_pngs(out: Path, hm, x, mask) -> None:
    """mask.png (white = kept) and overlay.png (the rest dimmed) at input resolution."""
    import numpy as np

    from .. import data
    m = mask[0, 0].cpu().numpy()
    rgb = data.denormalize(x[0], hm).permute(1, 2, 0).cpu().numpy()
    make_folder(out)
    save_png(out / "mask.png", (m * 255).astype(np.uint8))
    save_png(out / "overlay.png", overlay(rgb, m[..., None]))


def reference_images(args, hm, exclude: str):
    """Images whose activations define mean / resample ablation: --reference, else the
    offline sample photos other than the explained image."""
    import torch

    from .. import data
    if args.reference == "synthetic":
        from .. import synthetic
        return synthetic.make_dataset(64, seed=7).normalized()
    if args.reference:
        files = data.image_files(args.reference)
    else:
        files = [s for s in data.available_samples() if s != exclude][:8]
    return torch.cat([data.load_image(f, hm) for f in files])


def mask_from(folder: str, hm):
    """The binary mask (1, 1, H, W) in a folder written by `circuitlab explain`."""
    import numpy as np
    import torch
    from PIL import Image
    path = Path(folder) / "mask.png"
    if not path.is_file():
        raise CircuitlabError(f"{str(path)!r} does not exist; --explanation takes a folder "
                              f"written by `circuitlab explain`")
    m = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0
    if m.shape != tuple(hm.input_size[1:]):
        raise CircuitlabError(f"{str(path)!r} is {m.shape[1]}x{m.shape[0]}, but "
                              f"{hm.name} takes {hm.input_size[2]}x{hm.input_size[1]}")
    return torch.from_numpy((m > 0.5).astype(np.float32))[None, None]
