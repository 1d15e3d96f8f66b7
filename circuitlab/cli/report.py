"""`circuitlab report`: the analyses' tables and figures in one self-contained HTML page."""
from __future__ import annotations

import sys
from pathlib import Path

from ..errors import CircuitlabError
from ..files import refuse_overwrite
from ._common import add_outputs, emit


def cmd_report(args) -> int:
    from ..report import analyses_dir, build_report, run_analyses
    out = Path(args.out)
    page = out / "report.html"
    refuse_overwrite([page], args.force)
    if out.exists() and not out.is_dir():
        raise CircuitlabError(f"--out {out} is a file; pass a folder")
    if args.run:
        src = run_analyses(out / "analyses", quick=args.quick,
                           log=lambda s: print(s, file=sys.stderr))
    elif args.source:
        src = Path(args.source)
    else:
        try:
            src = analyses_dir() / "out"
        except CircuitlabError:
            raise CircuitlabError("no --from folder given and no source checkout to take "
                                  "analyses/out from; pass --from DIR or --run") from None
    found = build_report(src, page)
    emit(args, {"report": str(page), "sections": found, "source": str(src)},
         f"wrote {page} ({len(found)} analyses from {src})")
    return 0


def register(sub) -> None:
    p = sub.add_parser("report", help="one self-contained HTML page of the analyses",
                       description="Gather the analyses' tables and figures (analyses/*.py "
                                   "--out) into DIR/report.html, figures inlined; --run runs "
                                   "the analyses first (with --quick in minutes).")
    p.add_argument("--from", dest="source",
                   help="folder with one subfolder per analysis (default: analyses/out of "
                        "the source checkout)")
    p.add_argument("--run", action="store_true", help="run the analyses into "
                                                      "DIR/analyses first")
    p.add_argument("--quick", action="store_true",
                   help="with --run: each analysis's --quick variant (minutes)")
    add_outputs(p, "output folder", "replace an existing report.html")
    p.set_defaults(func=cmd_report)
