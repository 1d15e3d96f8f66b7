"""The analyses run end to end (their --quick variants), and the report gathers them into one
self-contained page that a real browser renders with every figure."""
import html.parser
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from circuitlab import cli
from circuitlab.report import markdown_to_html

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
QUICK = ("compare_methods", "sanity", "ablate_losses", "paper_figures", "units_needed",
         "circuits", "features")


def _main(script):
    """An analysis script's main(), imported in this process (no second torch start-up)."""
    sys.path.insert(0, str(ROOT / "analyses"))
    try:
        return importlib.import_module(script).main
    finally:
        sys.path.remove(str(ROOT / "analyses"))


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyses")
    for name in QUICK:
        assert _main(name)(["--quick", "--out", str(root / name)]) == 0, name
    return root


def test_compare_methods_quick(outputs):
    df = pd.read_csv(outputs / "compare_methods" / "compare.csv")
    assert set(df["method"]) == {"ours", "ours-minimal", "ours-area", "ours-regions",
                                 "gradcam", "gradcam++",
                                 "ig", "rise", "extremal"}
    equal, own = df[df["area"].notna()], df[df["area"].isna()]
    assert set(equal["area"]) == {0.05, 0.10}
    # the budget masks are optimised for each area, and their time includes the free run
    budget, free = df[df["method"] == "ours-area"], df[df["method"] == "ours"]
    assert budget["seconds"].min() > free["seconds"].max()
    # every method scored on the same images at each area
    assert equal.groupby(["area", "method"]).size().nunique() == 1
    # at a shared area the masks have it; at their own, ours and ours-minimal report theirs,
    # the minimal one never larger than the free mask it came from
    assert (equal["kept_area"] - equal["area"]).abs().max() < 0.01
    assert set(own["method"]) == {"ours", "ours-minimal", "ours-regions"}
    sizes = own.pivot(index="image", columns="method", values="kept_area")
    assert (sizes["ours-minimal"] <= sizes["ours"] + 1e-9).all()
    for col in ("grey", "blur", "gaussian", "uniform", "ratio", "regions", "top5"):
        assert df[col].notna().all(), col
    assert df["grey"].between(0, 1).all() and (df["regions"] >= 0).all()
    assert df[["confidence", "deletion", "insertion", "pointing", "iou", "precision"]].notna().all().all()
    assert df["pointing"].between(0, 1).all() and (df["seconds"] > 0).all()
    assert (outputs / "compare_methods" / "examples_synthetic-cnn.png").stat().st_size > 0


def test_sanity_quick(outputs):
    df = pd.read_csv(outputs / "sanity" / "sanity.csv")
    assert list(dict.fromkeys(df["randomised"])) == ["fc", "layer4"]   # from the top
    assert df["spearman"].between(-1, 1).all()
    assert (outputs / "sanity" / "sanity.png").stat().st_size > 0


def test_ablate_losses_quick(outputs):
    df = pd.read_csv(outputs / "ablate_losses" / "ablate_losses.csv")
    assert {"full", "-area", "-tv", "-nec", "+rob", "-act", "act x paper"} <= set(df["variant"])
    area = df.groupby("variant")["area"].mean()
    assert area["-area"] > area["full"]          # without the area prior nothing shrinks it
    # the explanation's circuit against the image's: shares and contrasts, not placeholders
    assert df["circuit_jaccard"].between(0, 1).all() and df["image_recall"].between(0, 1).all()
    assert df["circuit_contrast"].notna().all()


def test_paper_figures_quick(outputs):
    df = pd.read_csv(outputs / "paper_figures" / "paper_figures.csv")
    assert list(df["preset"]) == ["paper", "default"] and list(df["steps"]) == [3, 5]


def test_units_needed_quick(outputs):
    df = pd.read_csv(outputs / "units_needed" / "units_needed.csv")
    assert set(df["ranking"]) == {"attribution", "mean-delta"}
    assert set(df["layer"]) == {"layer2", "layer3", "layer4"}
    full = df[df["fraction"] == 1.0]
    assert (full["logit_fraction"] - 1).abs().max() < 1e-4 and full["meets"].all()
    md = (outputs / "units_needed" / "units_needed.md").read_text()
    assert "all (size-weighted)" in md


def test_analyses_refuse_to_overwrite(outputs, capsys):
    capsys.readouterr()
    assert _main("sanity")(["--quick", "--out", str(outputs / "sanity")]) == 2
    err = capsys.readouterr().err
    assert "--force" in err and "\n" not in err.strip()
    assert _main("compare_methods")(["--out", str(outputs / "x"), "--areas", "0.05,2"]) == 2
    assert "--areas" in capsys.readouterr().err
    assert _main("compare_methods")(["--out", str(outputs / "x"), "--models", "resnet"]) == 2
    assert "--models" in capsys.readouterr().err
    assert _main("compare_methods")(["--out", str(outputs / "none"), "--gather"]) == 2
    assert "does not exist" in capsys.readouterr().err
    # a folder the system will not make: one line, as the circuitlab commands give
    assert _main("sanity")(["--quick", "--out", "/proc/circuitlab-nope/x"]) == 2
    err = capsys.readouterr().err
    assert "cannot write in the folder" in err and "\n" not in err.strip()


def test_circuits_quick(outputs):
    df = pd.read_csv(outputs / "circuits" / "frontier.csv")
    assert set(df["ranking"]) == {"energy", "attribution", "iterative", "eap-ig", "random",
                                  "learned"}
    assert set(df["ablation"]) == {"mean", "resample"} and set(df["fraction"]) == {0.2, 0.6, 0.8}
    md = (outputs / "circuits" / "circuits.md").read_text()
    assert "## Size needed" in md and "synthetic-cnn 1" in md
    # the headline reads the frontier: iterative attribution under mean ablation reaches 80 %
    # at the smallest size in the table where its contrast is >= 0.8 with top-1 kept
    g = df[(df["ranking"] == "iterative") & (df["ablation"] == "mean")]
    ok = g[(g["contrast"] >= 0.8) & (g["top1_kept"] >= 1)]["fraction"]
    row = [r for r in md.splitlines() if r.startswith("| synthetic-cnn | iterative | mean |")]
    want = f"{100 * ok.min():.0f} % [" if len(ok) else "> 80 %"
    assert len(row) == 2 and row[0].split("|")[5].strip().startswith(want)   # size, curve
    assert (outputs / "circuits" / "example_circuit.html").stat().st_size > 10_000


def test_features_quick(outputs):
    df = pd.read_csv(outputs / "features" / "features.csv")
    assert set(df["basis"]) == {"channels", "features"}
    full = df[df["fraction"] == 1.0]
    assert (full["contrast"] - 1).abs().max() < 1e-4      # everything kept: the clean network
    nodes = df.groupby("basis")["total"].first()
    assert nodes["channels"] == 160 and nodes["features"] == 4 * 160 + 3
    assert (outputs / "features" / "dictionaries_synthetic-cnn.pt").is_file()
    md = (outputs / "features" / "features.md").read_text()
    assert "features (643)" in md and "channels (160)" in md


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.tables, self.external, self.frames = [], 0, [], 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag == "table":
            self.tables += 1
        if tag == "iframe":
            self.frames += 1
        for k in ("src", "href"):
            v = a.get(k) or ""
            if v and not v.startswith(("data:", "#")):
                self.external.append(v)


def test_report_is_self_contained(outputs, tmp_path, capsys):
    out = tmp_path / "rep"
    assert cli.main(["report", "--from", str(outputs), "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    p = _Page()
    p.feed(page)
    pngs = sorted(outputs.glob("*/*.png"))
    assert len(p.imgs) == len(pngs) >= 4
    assert all(s.startswith("data:image/png;base64,") for s in p.imgs)
    tables = sum(line.startswith("| ---") for md in outputs.glob("*/*.md")
                 for line in md.read_text().splitlines())
    assert p.tables == tables >= len(QUICK) and not p.external    # every table, nothing linked
    assert p.frames == len(list(outputs.glob("*/*.html"))) == 1   # the circuit view, inlined
    assert "Not run" not in page
    # every --quick section says so above its numbers
    assert page.count("A --quick smoke run") == len(QUICK)
    from circuitlab.report import build_report
    build_report(outputs, tmp_path / "q.html", title="circuitlab report (quick smoke run)",
                 note="not results")
    q = (tmp_path / "q.html").read_text()
    assert "<title>circuitlab report (quick smoke run)</title>" in q
    assert q.index('<p class="warning">not results</p>') < q.index("<h1>")   # first line
    # the repository's report names every analysis, titled, and says which did not run
    solo = tmp_path / "solo"
    shutil.copytree(outputs / "sanity", solo / "sanity")
    assert _main("report")(["--from", str(solo), "--out", str(tmp_path / "r1")]) == 0
    page = (tmp_path / "r1" / "report.html").read_text()
    assert page.count("Not run") == len(QUICK) - 1 and "Sanity check" in page
    # no silent overwrite, and one clear line for bad input
    assert cli.main(["report", "--from", str(outputs), "--out", str(out)]) == 2
    assert cli.main(["report", "--from", str(tmp_path / "none"), "--out",
                     str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert "--force" in err and "not a folder of analysis outputs" in err


def test_report_renders_in_a_headless_browser(outputs, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or \
        shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium on this machine (apt install chromium)")
    out = tmp_path / "rep"
    assert cli.main(["report", "--from", str(outputs), "--out", str(out)]) == 0
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                          "--virtual-time-budget=10000", "--dump-dom",
                          (out / "report.html").as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    n = len(sorted(outputs.glob("*/*.png")))
    # the page's own check: every figure decoded (naturalWidth > 0) after load
    assert f'data-figures="{n}/{n}"' in dom


def test_markdown_tables_to_html():
    h = markdown_to_html("# T\n\nsome `code` & text\n\n| a | b |\n| --- | --- |\n| 1 | x<y |\n")
    assert "<h3>T</h3>" in h and "<code>code</code> &amp; text" in h
    assert "<th>a</th>" in h and "<td>x&lt;y</td>" in h and "---" not in h
    sections = _main("report").__globals__["SECTIONS"]
    assert sorted(s[0] for s in sections) == sorted(QUICK)   # the report lists every analysis
