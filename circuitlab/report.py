"""One self-contained HTML page from the analyses' outputs (tables and figures inlined).

>>> from circuitlab.report import build_report
>>> build_report("analyses/out", "runs/report/report.html")

Each analysis writes a folder of Markdown tables and PNG figures (``analyses/*.py --out``);
the page shows them in a fixed order, converts the tables to HTML and embeds the figures as
data URIs, so the file opens anywhere without the folder beside it.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

from .errors import CircuitlabError
from .files import write_text

# (folder, title, what it answers) in the order the page shows them
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

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
h3{font-size:1.05em}
table{border-collapse:collapse;font-size:12px;margin:1em 0;display:block;overflow-x:auto}
th,td{border:1px solid #ddd;padding:2px 6px;text-align:right;white-space:nowrap}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
tr:nth-child(even) td{background:#fafafa}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}
.missing{color:#a00}.note{color:#555;font-size:.92em}code{background:#f3f3f3;padding:0 3px}
"""

# Marks figures that failed to decode, so a headless browser can check the page in one read.
_CHECK = """<script>
window.addEventListener('load', function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++;
  document.body.setAttribute('data-figures', ok + '/' + imgs.length);
});
</script>"""


def _inline(text: str) -> str:
    text = html.escape(text)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)


def markdown_to_html(md: str) -> str:
    """The Markdown the analyses write: headings, paragraphs, pipe tables, `code`."""
    out, para, table = [], [], []

    def flush():
        if para:
            out.append(f"<p>{_inline(' '.join(para))}</p>")
            para.clear()
        if table:
            rows = [[c.strip() for c in r.strip().strip("|").split("|")] for r in table
                    if not re.fullmatch(r"\|?(\s*-+\s*\|)+\s*-*\s*\|?", r.strip())]
            head, body = rows[0], rows[1:]
            out.append("<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head)
                       + "</tr></thead><tbody>" + "".join(
                           "<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>"
                           for r in body) + "</tbody></table>")
            table.clear()

    for line in md.splitlines():
        s = line.strip()
        if s.startswith("|"):
            if para:
                flush()
            table.append(s)
            continue
        if table:
            flush()
        if not s:
            flush()
        elif s.startswith("#"):
            flush()
            out.append(f"<h3>{_inline(s.lstrip('#').strip())}</h3>")
        else:
            para.append(s)
    flush()
    return "\n".join(out)


def _figure(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">'
            f'<figcaption class="note">{html.escape(path.name)}</figcaption></figure>')


def _view(path: Path) -> str:
    """An interactive page of an analysis (a circuit view) inlined as an iframe's srcdoc."""
    return (f'<figure><iframe title="{html.escape(path.name)}" srcdoc="'
            f'{html.escape(path.read_text(), quote=True)}" style="width:100%;height:760px;'
            f'border:1px solid #eee"></iframe><figcaption class="note">'
            f'{html.escape(path.name)} (interactive: hover a node)</figcaption></figure>')


def render(src: Union[str, os.PathLike]) -> tuple[str, list[str]]:
    """(HTML text, the sections found) from a folder holding one subfolder per analysis."""
    src = Path(src)
    if not src.is_dir():
        raise CircuitlabError(f"{src} is not a folder of analysis outputs; run the analyses "
                              f"(python analyses/<name>.py --out {src}/<name>) or pass --run")
    found, parts = [], []
    for folder, title, what in SECTIONS:
        d = src / folder
        parts.append(f'<h2 id="{folder}">{html.escape(title)}</h2>'
                     f'<p class="note">{html.escape(what)}</p>')
        mds, pngs = sorted(d.glob("*.md")), sorted(d.glob("*.png"))
        if not (mds or pngs):
            parts.append(f'<p class="missing">Not run: <code>python analyses/{folder}.py '
                         f'--out {html.escape(str(d))}</code></p>')
            continue
        found.append(folder)
        parts += [markdown_to_html(p.read_text()) for p in mds]
        parts += [_figure(p) for p in pngs if not p.name.endswith(".tmp.png")]
        parts += [_view(p) for p in sorted(d.glob("*.html")) if ".tmp" not in p.name]
    if not found:
        raise CircuitlabError(f"no analysis outputs under {src} (expected subfolders "
                              f"{', '.join(f for f, _, _ in SECTIONS)}); run them first or "
                              f"pass --run")
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    toc = " · ".join(f'<a href="#{f}">{html.escape(t)}</a>' for f, t, _ in SECTIONS)
    page = ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<title>circuitlab report</title><style>" + _STYLE + "</style></head><body>"
            f"<h1>circuitlab report</h1><p class=\"note\">Built {stamp} from "
            f"<code>{html.escape(str(src))}</code>: {len(found)} of {len(SECTIONS)} analyses."
            f"</p><p>{toc}</p>" + "\n".join(parts) + _CHECK + "</body></html>\n")
    return page, found


def analyses_dir() -> Path:
    """The source checkout's ``analyses/`` folder (the scripts are not part of the wheel)."""
    d = Path(__file__).resolve().parents[1] / "analyses"
    if not (d / "compare_methods.py").is_file():
        raise CircuitlabError("--run needs a source checkout of circuitlab (its analyses/ "
                              "folder); gather outputs you already have with --from DIR")
    return d


def run_analyses(dest: Union[str, os.PathLike], quick: bool = True,
                 names: Optional[Sequence[str]] = None, log=print) -> Path:
    """Run each analysis script into ``dest/<name>`` (``--quick``: minutes, not hours)."""
    scripts = analyses_dir()
    dest = Path(dest)
    for folder, _, _ in SECTIONS:
        if names is not None and folder not in names:
            continue
        cmd = [sys.executable, str(scripts / f"{folder}.py"), "--out", str(dest / folder),
               "--force"] + (["--quick"] if quick else [])
        log(f"running {' '.join(cmd[1:])}")
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise CircuitlabError(f"analyses/{folder}.py failed: {tail[0]}")
    return dest


def build_report(src: Union[str, os.PathLike], out_file: Union[str, os.PathLike]
                 ) -> list[str]:
    """Write the page to ``out_file`` atomically; returns the sections found."""
    page, found = render(src)
    write_text(out_file, page)
    return found
