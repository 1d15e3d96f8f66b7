"""The Python examples of the README and of every page in docs/ run as written, each page in
a fresh namespace (a page's examples may build on each other, never on another page's)."""
import re
import warnings
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def _blocks(page: Path) -> list:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def _check_readme(scope, tmp_path):
    assert scope["ex"].mask.shape == (1, 1, 224, 224) and scope["ex"].certificates
    assert scope["zeroed"].shape == (8, 1, 1000)
    assert len(scope["c"].units) and set(scope["c"].units) <= set(scope["hm"].taps)


def _check_hooks(scope, tmp_path):
    assert scope["zeroed"].shape == (32, 1, 1000)
    assert scope["patched"].shape == (16, 1, 1000)
    assert scope["circuit"].shape == (1, 1, 1000)
    assert scope["cache"]["blocks.3.attn.hook_pattern"].shape[1] == 6
    hm, acts = scope["hm"], scope["acts"]
    assert [tuple(a.shape[1:]) for a in acts] == [hm.point(n).shape[1:] for n in hm.taps]


def _check_explain(scope, tmp_path):
    assert scope["ex"].mask.shape == (1, 1, 224, 224)
    assert abs(scope["at5"].area.item() - 0.05) < 0.001 and scope["at5"].found.shape == (1,)
    rx = scope["rx"]
    assert bool(rx.found[0]) and 1 <= len(rx.certificates[0].regions) <= 5


def _check_circuits(scope, tmp_path):
    assert (tmp_path / "out" / "edges.csv").is_file() and (tmp_path / "circuit.png").is_file()
    assert set(scope["c"].units) == set(scope["hm"].taps)
    assert (tmp_path / "circuit.html").is_file() and (tmp_path / "dicts.pt").is_file()
    assert set(scope["need"]["ranking"]) == {"energy", "attribution", "iterative", "eap-ig",
                                             "random"}
    assert set(scope["feature_df"]["fraction"]) == {0.1, 0.4}


def _check_baselines(scope, tmp_path):
    assert scope["sal"].shape == (1, 1, 224, 224) and scope["mask"].mean() == pytest.approx(
        0.05, abs=0.001)


def _check_kernels(scope, tmp_path):
    assert scope["loss"].ndim == 0 and torch.isfinite(scope["loss"])
    assert scope["best"].shape == (32, 4)


CHECKS = {"README.md": _check_readme, "hooks.md": _check_hooks, "explain.md": _check_explain,
          "circuits.md": _check_circuits, "baselines.md": _check_baselines,
          "kernels.md": _check_kernels}


def test_every_page_with_examples_is_checked():
    with_code = {p.name for p in PAGES if _blocks(p)}
    assert with_code == set(CHECKS), "a page's examples run unchecked (or a check lost its page)"


@pytest.mark.parametrize("page", [p for p in PAGES if p.name in CHECKS], ids=lambda p: p.name)
def test_python_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that save files write here, not into the repo
    scope: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the ViT example falls back to random weights offline
        for code in _blocks(page):
            exec(compile(code, str(page), "exec"), scope)
    CHECKS[page.name](scope, tmp_path)


def test_the_readme_prints_what_the_main_job_prints():
    """The README's printed line has the shape the CLI prints (.ci/run compares the numbers
    with a real run of the main job)."""
    import re

    from circuitlab.cli.explain import _summary
    text = (ROOT / "README.md").read_text()
    line = next(t for t in text.splitlines() if t.startswith("coffee: "))
    m = re.fullmatch(r"coffee: (\w+) kept=(\w+) area=([\d.]+) regions=(\d+) conf ([\d.]+) -> "
                     r"([\d.]+) necessity_drop=([\d.]+) locally_minimal=(\w+) \(([\d.]+) s\)",
                     line)
    assert m, line
    label, kept, area, regions, ci, ce, nd, lm, s = m.groups()
    result = {"image": "coffee", "label": label, "top1_kept": kept == "True",
              "area_fraction": float(area), "regions": int(regions),
              "confidence_image": float(ci), "confidence_explanation": float(ce),
              "necessity_drop": float(nd), "locally_minimal": lm == "True", "seconds": float(s)}
    assert _summary([result]) == line
