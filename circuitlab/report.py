"""One self-contained HTML page from folders of analysis outputs (tables and figures inlined).

>>> from circuitlab.report import build_report
>>> build_report("analyses/out", "runs/report/report.html", sections=[
...     ("compare_methods", "Saliency methods at equal area", "Every method at one area.")])

Each analysis writes a folder of Markdown tables, PNG figures and interactive HTML views;
the page shows the sections the caller names, in that order (by default every subfolder,
alphabetically), converts the tables to HTML and embeds the figures as data URIs, so the
file opens anywhere without the folder beside it. The library does not know which analyses
exist: the repository's list and their runner are ``analyses/report.py``.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import os
import re
from pathlib import Path
from typing import Optional, Sequence, Union

from .errors import CircuitlabError
from .files import write_text

Section = tuple  # (folder, title, what it answers)

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
.warning{background:#fff3cd;border:1px solid #e0b000;padding:.5em .8em;font-weight:600}
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


def _sections(src: Path, sections: Optional[Sequence[Section]]) -> list:
    if sections is not None:
        return list(sections)
    return [(d.name, d.name.replace("_", " ").capitalize(), "")
            for d in sorted(src.iterdir()) if d.is_dir()]


def render(src: Union[str, os.PathLike], sections: Optional[Sequence[Section]] = None,
           title: str = "circuitlab report", note: Optional[str] = None
           ) -> tuple[str, list[str]]:
    """(HTML text, the sections found) from a folder holding one subfolder per analysis;
    ``sections``: (folder, title, blurb) in page order, default every subfolder. A
    section's ``WARNING.txt`` is shown above its tables; ``note``, when given, is the page's
    first line (e.g. what kind of run it shows)."""
    src = Path(src)
    if not src.is_dir():
        raise CircuitlabError(f"{src} is not a folder of analysis outputs (one subfolder "
                              f"per analysis, each with .md tables or .png figures)")
    sections = _sections(src, sections)
    found, parts = [], []
    for folder, heading, what in sections:
        d = src / folder
        parts.append(f'<h2 id="{folder}">{html.escape(heading)}</h2>'
                     + (f'<p class="note">{html.escape(what)}</p>' if what else ""))
        mds, pngs = sorted(d.glob("*.md")), sorted(d.glob("*.png"))
        if not (mds or pngs):
            parts.append(f'<p class="missing">Not run: no tables or figures in '
                         f'<code>{html.escape(str(d))}</code></p>')
            continue
        found.append(folder)
        if (d / "WARNING.txt").is_file():   # e.g. a smoke run's numbers: said before them
            parts.append(f'<p class="warning">{html.escape((d / "WARNING.txt").read_text())}'
                         f'</p>')
        parts += [markdown_to_html(p.read_text()) for p in mds]
        parts += [_figure(p) for p in pngs if not p.name.endswith(".tmp.png")]
        parts += [_view(p) for p in sorted(d.glob("*.html")) if ".tmp" not in p.name]
    if not found:
        raise CircuitlabError(f"no analysis outputs under {src} (expected subfolders "
                              f"{', '.join(f for f, _, _ in sections) or 'with .md or .png'})")
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    toc = " · ".join(f'<a href="#{f}">{html.escape(t)}</a>' for f, t, _ in sections)
    page = ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>" + _STYLE + "</style></head><body>"
            + (f'<p class="warning">{html.escape(note)}</p>' if note else "")
            + f"<h1>{html.escape(title)}</h1><p class=\"note\">Built {stamp} from "
            f"<code>{html.escape(str(src))}</code>: {len(found)} of {len(sections)} "
            f"sections.</p><p>{toc}</p>" + "\n".join(parts) + _CHECK + "</body></html>\n")
    return page, found


def build_report(src: Union[str, os.PathLike], out_file: Union[str, os.PathLike],
                 sections: Optional[Sequence[Section]] = None,
                 title: str = "circuitlab report", note: Optional[str] = None) -> list[str]:
    """Write the page to ``out_file`` atomically; returns the sections found."""
    page, found = render(src, sections, title, note)
    write_text(out_file, page)
    return found
