"""One checkpoint format for models and explainers, read with weights_only=True; files of the
earlier formats still read."""
import pytest
import torch

from circuitlab import checkpoints
from circuitlab.errors import CircuitlabError


def test_save_and_load_by_kind(tmp_path):
    path = checkpoints.save(tmp_path / "m.pt", "model", {"arch": "x", "state_dict": {
        "w": torch.ones(2)}})
    obj = checkpoints.load(path, "model")
    assert obj["format"] == checkpoints.FORMAT and obj["kind"] == "model"
    assert torch.equal(obj["state_dict"]["w"], torch.ones(2))
    with pytest.raises(CircuitlabError, match="not a circuitlab explainer checkpoint"):
        checkpoints.load(path, "explainer")
    with pytest.raises(CircuitlabError, match="exists"):
        checkpoints.save(path, "model", {})
    checkpoints.save(path, "explainer", {"step": 3}, overwrite=True)
    assert checkpoints.load(path, "explainer")["step"] == 3


def test_earlier_formats_still_read(tmp_path):
    torch.save({"format": "circuitlab.checkpoint/1", "arch": "x"}, tmp_path / "m.pt")
    torch.save({"format": "circuitlab-explainer-1", "step": 1}, tmp_path / "e.pt")
    torch.save({"fc.weight": torch.ones(1)}, tmp_path / "sd.pt")
    assert checkpoints.load(tmp_path / "m.pt", "model")["arch"] == "x"
    assert checkpoints.load(tmp_path / "e.pt", "explainer")["step"] == 1
    assert checkpoints.kind_of(checkpoints.read(tmp_path / "sd.pt")) == ""


def test_bad_files_are_one_clear_error(tmp_path):
    with pytest.raises(CircuitlabError, match="does not exist; train one"):
        checkpoints.load(tmp_path / "none.pt", "explainer", missing="; train one")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CircuitlabError, match="weights_only=True"):
        checkpoints.read(tmp_path / "junk.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CircuitlabError, match="holds a list"):
        checkpoints.read(tmp_path / "list.pt")
    with pytest.raises(CircuitlabError, match="kind must be one of"):
        checkpoints.save(tmp_path / "k.pt", "optimizer", {})


class _Evil:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickled_code_never_runs(tmp_path, capsys):
    torch.save({"format": checkpoints.FORMAT, "kind": "model", "x": _Evil()}, tmp_path / "e.pt")
    with pytest.raises(CircuitlabError, match="weights_only=True"):
        checkpoints.load(tmp_path / "e.pt", "model")
    assert "pickled code ran" not in capsys.readouterr().out
