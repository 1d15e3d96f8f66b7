"""Renamed keywords: the old name works for one release, warns, and means the same."""
import warnings

import pytest
import torch

from circuitlab import CircuitlabError
from circuitlab.circuits import ReadoutConfig, faithfulness, read_circuit
from circuitlab.cli import main
from circuitlab.cli._common import ABLATIONS
from circuitlab.deprecations import renamed
from circuitlab.interventions import ABLATIONS as DECLARED
from helpers import batch_for


def test_renamed_moves_the_keyword_and_warns_once_per_call():
    @renamed(old="new")
    def f(*, new=0):
        return new
    with pytest.warns(DeprecationWarning, match=r"f\(old=...\) is now new="):
        assert f(old=3) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert f(new=4) == 4
    with pytest.raises(CircuitlabError, match="pass new= only"):
        f(old=1, new=2)


def test_ablation_was_called_method(small_resnet):
    hm, x = small_resnet, batch_for(small_resnet)
    v = hm.each_unit("layer1", range(3))
    with pytest.warns(DeprecationWarning, match="ablation="):
        old = hm.ablate(x, v, method="zero")
    torch.testing.assert_close(old, hm.ablate(x, v, ablation="zero"))
    with pytest.warns(DeprecationWarning, match=r"ReadoutConfig\(method="):
        assert ReadoutConfig(method="zero") == ReadoutConfig(ablation="zero")
    with pytest.warns(DeprecationWarning):
        assert ReadoutConfig().replace(method="zero").ablation == "zero"


def test_circuit_functions_take_the_old_keyword(small_resnet):
    hm, x = small_resnet, batch_for(small_resnet, 1)
    refs = batch_for(small_resnet, 4, seed=1)
    kw = dict(select_by="energy", k=2, layers=["layer1", "layer2"], edges="none",
              reference=refs)
    with pytest.warns(DeprecationWarning, match=r"read_circuit\(method="):
        c = read_circuit(hm, x, method="zero", **kw)
    assert c.meta == read_circuit(hm, x, ablation="zero", **kw).meta
    with pytest.warns(DeprecationWarning, match=r"faithfulness\(method="):
        old = faithfulness(hm, x, c, method="zero", reference=refs, n_random=0)
    assert old.equals(faithfulness(hm, x, c, ablation="zero", reference=refs, n_random=0))


def test_the_cli_lists_the_declared_ablations_and_warns_on_method(capsys, tmp_path):
    assert ABLATIONS == DECLARED
    code = main(["ablate", "--model", "resnet18", "--random-weights", "--layer", "nope",
                 "--method", "zero", "--out", str(tmp_path / "a.csv")])
    err = capsys.readouterr().err
    assert "--method is now --ablation" in err and code == 2 and "nope" in err
