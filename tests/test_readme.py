"""The README's Python examples run as written."""
import re
import warnings
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that save files write here, not into the repo
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    scope: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the ViT example falls back to random weights offline
        for code in blocks:
            exec(compile(code, str(README), "exec"), scope)
    assert scope["zeroed"].shape == (32, 1, 1000)
    assert scope["patched"].shape == (16, 1, 1000)
    assert scope["circuit"].shape == (1, 1, 1000)
    assert scope["cache"]["blocks.3.attn.hook_pattern"].shape[1] == 6
    assert scope["ex"].mask.shape == (1, 1, 224, 224)
    assert abs(scope["at5"].area.item() - 0.05) < 0.001 and scope["at5"].found.shape == (1,)
    assert (tmp_path / "out" / "edges.csv").is_file() and (tmp_path / "circuit.png").is_file()
    assert set(scope["c"].units) == set(scope["hm"].taps)
    assert (tmp_path / "circuit.html").is_file() and (tmp_path / "dicts.pt").is_file()
    assert set(scope["need"]["ranking"]) == {"energy", "attribution", "iterative", "eap-ig",
                                             "random"}
    assert set(scope["feature_df"]["fraction"]) == {0.1, 0.4}
