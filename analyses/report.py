"""The repository's analyses in one self-contained HTML page, titled and in order.

    python analyses/report.py --out runs/report                  # from analyses/out
    python analyses/report.py --out runs/report --run --quick    # run each analysis first

``circuitlab report --from DIR --out DIR`` renders any folder of analysis outputs; this
script adds what only the repository knows: which analyses exist, what each answers, and
how to run them (``--run``: every script into ``--out/analyses``, ``--quick`` in minutes).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from circuitlab.errors import CircuitlabError
from circuitlab.report import build_report

from _common import QUICK_NOTE, fail, refuse_clash

PROG = "analyses/report.py"
HERE = Path(__file__).resolve().parent
# (folder = script name, title, what it answers) in the order the page shows them
SECTIONS = (
    ("paper_figures", "The paper's examples, measured",
     "Explanations with the paper's settings on real photos, beside Grad-CAM and our default."),
    ("compare_methods", "Saliency methods at equal area",
     "Every method binarised at the same area on the same images, with the same metrics."),
    ("ablate_losses", "What each loss term buys", "Leave-one-out over the objective."),
    ("sanity", "Sanity check: model-parameter randomisation",
     "Explanations must change when the weights they explain do (Adebayo et al. 2018)."),
    ("circuits", "The circuit frontier",
     "Contrast kept against circuit size for every way of choosing circuits, across model "
     "families, and one circuit drawn."),
    ("units_needed", "Can a sparse circuit exist?",
     "How much of each tapped layer, on its own, carries the decision."),
    ("features", "Circuits of dictionary features",
     "The same frontier with sparse-dictionary features and error nodes as the nodes."),
)


def run_all(dest: Path, quick: bool, log=print) -> None:
    """Each analysis script into ``dest/<name>``; the first failure stops with its last line."""
    for folder, _, _ in SECTIONS:
        cmd = [sys.executable, str(HERE / f"{folder}.py"), "--out", str(dest / folder),
               "--force"] + (["--quick"] if quick else [])
        log(f"running {' '.join(cmd[1:])}")
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"analyses/{folder}.py failed: {tail[0]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (report.html goes there)")
    p.add_argument("--from", dest="source", default=str(HERE / "out"),
                   help="folder with one subfolder per analysis (default analyses/out)")
    p.add_argument("--run", action="store_true",
                   help="run every analysis into OUT/analyses first, and report those")
    p.add_argument("--quick", action="store_true", help="with --run: the --quick variants")
    p.add_argument("--force", action="store_true", help="replace an existing report.html")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return fail(PROG, f"--out {out} is a file; pass a folder")
    refused = refuse_clash(PROG, out, ["report.html"], args.force)
    if refused is not None:
        return refused
    src = Path(args.source)
    try:
        if args.run:
            src = out / "analyses"
            run_all(src, args.quick, log=lambda s: print(s, file=sys.stderr))
        quick = args.run and args.quick
        found = build_report(src, out / "report.html", sections=SECTIONS,
                             title="circuitlab report" + (" (quick smoke run)" if quick else ""),
                             note=QUICK_NOTE if quick else None)
    except (RuntimeError, CircuitlabError) as e:   # one line, as every analysis fails
        return fail(PROG, str(e))
    print(f"wrote {out / 'report.html'} ({len(found)} of {len(SECTIONS)} analyses from {src})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
