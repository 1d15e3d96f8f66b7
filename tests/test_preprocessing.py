"""The typed data config: partial configs take ImageNet's defaults, bad values are one clear
error, and it reads like timm's dict."""
import pytest
import torch

from circuitlab.errors import CircuitlabError
from circuitlab.preprocessing import IMAGENET, DataConfig, denormalize, make_transform, normalize


def test_partial_configs_take_imagenet_defaults():
    cfg = DataConfig.of({"input_size": (3, 32, 32)})
    assert cfg.input_size == (3, 32, 32) and cfg.mean == IMAGENET.mean
    assert DataConfig.of(None) == IMAGENET and DataConfig.of(cfg) is cfg
    assert DataConfig.of({"input_size": [3, 8, 8], "mean": [0.5] * 3}).mean == (0.5, 0.5, 0.5)


def test_reads_like_a_dict():
    cfg = DataConfig(input_size=(3, 16, 16), mean=(0.5,) * 3, std=(0.25,) * 3)
    assert cfg["input_size"] == (3, 16, 16) and dict(cfg)["std"] == (0.25,) * 3
    assert {**cfg, "crop_pct": 1.0}["crop_pct"] == 1.0 and len(cfg) == 6 and "mean" in cfg
    assert cfg == dict(cfg) and cfg.replace(crop_pct=1.0) != cfg
    with pytest.raises(KeyError):
        cfg["size"]
    with pytest.raises(AttributeError):        # frozen
        cfg.mean = (0, 0, 0)


class _WithConfig:
    data_config = {"input_size": (3, 4, 4), "mean": (0.5,) * 3, "std": (0.5,) * 3}


@pytest.mark.parametrize("bad, message", [
    ({"input_szie": (3, 8, 8)}, "unknown data config key"),
    ({"input_size": (8, 8)}, "input_size must be"),
    ({"std": (0.5, 0.0, 0.5)}, "std > 0"),
    ({"mean": (0.5,) * 3, "std": (0.5,) * 2}, "one value per channel"),
    ({"crop_pct": 1.5}, "crop_pct"),
    ({"interpolation": "cubic"}, "interpolation"),
    ({"mean": ("a", 0, 0)}, "must be numbers"),
    ("not a config", "expected a HookedModel or a data config"),
])
def test_bad_configs_are_one_clear_error(bad, message):
    with pytest.raises(CircuitlabError, match=message):
        DataConfig.of(bad)


def test_normalize_round_trip_and_the_transform():
    pix = torch.rand(2, 3, 4, 4)
    x = normalize(pix, _WithConfig())
    torch.testing.assert_close(x, (pix - 0.5) / 0.5)
    torch.testing.assert_close(denormalize(x, _WithConfig.data_config), pix)
    from PIL import Image
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    t = make_transform({"input_size": (3, 8, 8), "crop_pct": 1.0, "mean": (0,) * 3,
                        "std": (1,) * 3})(img)
    assert t.shape == (3, 8, 8) and torch.allclose(t[0], torch.ones(8, 8))
