"""Which mode an `explain` command line asks for (flags of one mode pick it under --mode
auto, flags of two are one line), and the regions mode's flags: parsed, handed to the
search, and reported in metrics.json."""
from __future__ import annotations

import argparse

from ..errors import CircuitlabError
from ._common import fraction, positive_int

SEGMENTS = 128       # --mode regions: explain.regions.RegionSearch's default, without torch
CONFIDENT_WITHIN = 0.15      # the same for --confident-within
# flags of regions mode: under --mode auto, giving any of them picks regions mode
REGION_FLAGS = ("segments", "confident_within", "fills", "robust_draws", "finer_segments",
                "scoring")
FILLS = ("grey", "gaussian")    # the same for --fills
FINER = (256, 512)              # the same for --finer-segments
SCORING = ("compiled", "eager")  # --scoring: RegionSearch(compiled=True), the default, or not
# flags of per-image mode and their defaults: under --mode auto, giving any of them picks
# per-image mode whatever the input size
PER_IMAGE_FLAGS = {"area": None, "reasons": 1, "preset": "default", "steps": None,
                   "minimal": True, "precision": "fp32", "compile": "off",
                   "channels_last": False, "fold_batchnorm": False}


def add_region_flags(p) -> None:
    """The flags of regions mode (REGION_FLAGS: under --mode auto any of them picks it)."""
    p.add_argument("--segments", type=positive_int, default=None,
                   help=f"regions mode: superpixels to build the mask from (default "
                        f"{SEGMENTS})")
    p.add_argument("--confident-within", type=within_arg, default=None, metavar="AREA|off",
                   help=f"regions mode: where the set that keeps the label is less sure than "
                        f"the image, grow it until it is as sure, to at most this fraction "
                        f"of the image, and prune it again at that confidence; off keeps the "
                        f"label's set (default {CONFIDENT_WITHIN})")
    p.add_argument("--fills", type=fills_arg, default=None, metavar="KIND,KIND,...",
                   help=f"regions mode: what fills the rest of the image while a set is "
                        f"scored; the label must hold under each (grey, gaussian, uniform, "
                        f"blur; a kind named twice is two draws; for masks that survive "
                        f"fresh noise see --robust-draws) (default {','.join(FILLS)})")
    p.add_argument("--robust-draws", type=positive_int, default=None,
                   metavar="K",
                   help="regions mode: grow the set found by whole superpixels until top-1 "
                        "holds by a margin under the mean colour and K fresh draws of each "
                        "noise fill, then prune it under them (to at most 40 %% of the "
                        "image; else the set found stays): masks kept under fresh noise, "
                        "larger and slower (docs/explain.md) (default off)")
    p.add_argument("--finer-segments", type=finer_arg, default=None, metavar="N[,N...]|off",
                   help=f"regions mode: a set still over 10 %% of the image is cut along a "
                        f"finer SLIC of N superpixels and pruned again, and along each next "
                        f"N while it is still over (docs/explain.md); off: no finer pass "
                        f"(default {','.join(map(str, FINER))})")
    p.add_argument("--scoring", choices=SCORING, default=None,
                   help="regions mode: score the sets through the model compiled ahead of "
                        "time for this CPU (compiled once per model and input size, then "
                        "cached; where it cannot compile, the eager model, one warning) or "
                        "through the eager model (no compile, slower); metrics.json says "
                        "which ran (default compiled)")


def region_search(args):
    """The RegionSearch the command line gives (what it leaves out: the search's defaults);
    the --mode regions explanation and its --reasons both search with it."""
    from ..explain.regions import RegionSearch     # imports torch: only once a model runs
    given = {k: getattr(args, k) for k in REGION_FLAGS + ("confidence",)
             if getattr(args, k) is not None}
    if given.get("confident_within") == "off":
        given["confident_within"] = None
    if "finer_segments" in given:
        given["refine"] = given.pop("finer_segments") or None
    if "scoring" in given:
        given["compiled"] = given.pop("scoring") == "compiled"
    return RegionSearch(**given)


def region_report(args, rounds: list, scoring: str) -> dict:
    """What metrics.json says of the search's settings (``off`` as given), how its sets
    were scored (``scoring``: what ran, compiled or eager) and, with --robust-draws, whether
    its growth got there (its last round held)."""
    grown = [r for r in rounds if r["step"] == "robust"]
    return {"segments": args.segments or SEGMENTS,
            "confident_within": CONFIDENT_WITHIN if args.confident_within is None
            else args.confident_within,
            "fills": list(args.fills or FILLS), "robust_draws": args.robust_draws or 0,
            "finer_segments": list(FINER if args.finer_segments is None
                                   else args.finer_segments),
            "scoring": scoring,
            "robust_held": bool(grown and grown[-1]["holds"]) if args.robust_draws else None}


def fills_arg(text: str) -> tuple:
    """--fills: a comma-separated list of the kinds ``backgrounds`` declares, checked as the
    command line is read (before the model loads)."""
    from ..backgrounds import KINDS       # imports torch: only when the flag is given
    kinds = tuple(k.strip() for k in text.split(","))
    if not all(k in KINDS for k in kinds):
        raise argparse.ArgumentTypeError(f"takes one or more of {', '.join(KINDS)}, comma-"
                                         f"separated (a kind twice is two draws), e.g. "
                                         f"grey,gaussian; got {text!r}")
    return kinds


def finer_arg(text: str) -> tuple:
    """--finer-segments: superpixel counts of the finer passes, comma-separated, or off (())."""
    if text == "off":
        return ()
    try:
        counts = tuple(int(k) for k in text.split(","))
    except ValueError:
        counts = ()
    if not counts or not all(2 <= k <= 1024 for k in counts):
        raise argparse.ArgumentTypeError(f"takes superpixel counts from 2 to 1024, comma-"
                                         f"separated (one finer pass each), or off; got "
                                         f"{text!r}")
    return counts


def within_arg(text: str):
    """--confident-within: a fraction of the image, or off."""
    return "off" if text == "off" else fraction(text)


def resolved_mode(mode: str, image_size: int) -> str:
    """--mode auto once the input size is known: regions for photos (inputs of at least
    ``explain.config.LARGE_INPUT`` px a side), per-image below (superpixels of a small input
    are as large as its objects: docs/results.md); any other mode as it is."""
    from ..explain.config import LARGE_INPUT
    if mode != "auto":
        return mode
    return "regions" if image_size >= LARGE_INPUT else "per-image"


# per-image flags regions mode takes too, when named with --mode regions
SHARED_FLAGS = ("reasons",)


def per_image_flags(args, shared: bool = True) -> str:
    """The per-image flags given, as the command line spells them ('' when none);
    ``shared``: with those regions mode takes too (SHARED_FLAGS)."""
    given = []
    for name, default in PER_IMAGE_FLAGS.items():
        if not shared and name in SHARED_FLAGS:
            continue
        value = getattr(args, name)
        if value != default:   # --no-minimal is the one off-switch among them
            given.append(f"--no-{name}" if value is False else "--" + name.replace("_", "-"))
    return ", ".join(given)


def region_flags(args) -> str:
    """The regions-mode flags given, as the command line spells them ('' when none)."""
    return ", ".join("--" + k.replace("_", "-") for k in REGION_FLAGS
                     if getattr(args, k) is not None)


def belong(flags: str) -> str:
    return "belong" if "," in flags else "belongs"


def auto_mode(args) -> str:
    """--mode auto before the model loads: per-image when a per-image flag is given, regions
    when a regions flag is, else still auto (the input size decides, in ``_explain_batch``)."""
    per_image, regions = per_image_flags(args), region_flags(args)
    if regions and per_image:
        raise CircuitlabError(f"{regions} {belong(regions)} to --mode regions, {per_image} "
                              f"to per-image mode: drop one, or name the mode with --mode")
    return "regions" if regions else "per-image" if per_image else "auto"
