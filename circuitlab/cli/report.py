"""`circuitlab report`: folders of analysis outputs in one self-contained HTML page."""
from __future__ import annotations

from pathlib import Path

from ..errors import CircuitlabError
from ..files import refuse_overwrite
from ._common import add_outputs, emit


def cmd_report(args) -> int:
    from ..report import build_report
    out = Path(args.out)
    page = out / "report.html"
    refuse_overwrite([page], args.force)
    if out.exists() and not out.is_dir():
        raise CircuitlabError(f"--out {out} is a file; pass a folder")
    found = build_report(args.source, page)
    emit(args, {"report": str(page), "sections": found, "source": str(args.source)},
         f"wrote {page} ({len(found)} sections from {args.source})")
    return 0


def register(sub) -> None:
    p = sub.add_parser("report", help="one self-contained HTML page of analysis outputs",
                       description="Gather folders of Markdown tables, PNG figures and HTML "
                                   "views (one subfolder per analysis, e.g. analyses/out) into "
                                   "DIR/report.html, figures inlined. The repository's "
                                   "analyses, titled and in order, and a --run that runs "
                                   "them first: python analyses/report.py.")
    p.add_argument("--from", dest="source", required=True,
                   help="folder with one subfolder per analysis (e.g. analyses/out)")
    add_outputs(p, "output folder", "replace an existing report.html")
    p.set_defaults(func=cmd_report)
