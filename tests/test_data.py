"""load_image: file modes converted to RGB, samples, folders, and clear errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from circuitlab import CircuitlabError
from circuitlab.data import available_samples, denormalize, image_files, load_image

RAW = {"input_size": (3, 8, 8), "mean": (0, 0, 0), "std": (1, 1, 1), "crop_pct": 1.0,
       "interpolation": "nearest"}


def test_modes_become_rgb(tmp_path):
    grey = Image.fromarray(np.full((8, 8), 128, np.uint8), "L")
    rgba = Image.fromarray(np.dstack([np.full((8, 8, 3), 0, np.uint8),
                                      np.full((8, 8), 0, np.uint8)]), "RGBA")  # transparent
    pal = grey.convert("P")
    deep = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    for name, img in {"g.png": grey, "a.png": rgba, "p.png": pal, "d.png": deep}.items():
        img.save(tmp_path / name)
    g, a, p, d = (load_image(tmp_path / n, RAW) for n in ("g.png", "a.png", "p.png", "d.png"))
    for t in (g, a, p, d):
        assert t.shape == (1, 3, 8, 8) and t.dtype == torch.float32
    torch.testing.assert_close(g, torch.full_like(g, 128 / 255))
    torch.testing.assert_close(a, torch.ones_like(a))     # transparent -> white background
    torch.testing.assert_close(p, g)
    torch.testing.assert_close(d, torch.ones_like(d))     # 16-bit full scale -> 1.0


def test_samples_and_model_preprocessing():
    assert {"coffee", "chelsea", "rocket", "astronaut"} <= set(available_samples())
    # distinct photos only: skimage's cat is chelsea, loadable by name but not listed twice
    assert "cat" not in available_samples()
    assert torch.equal(load_image("cat", {"input_size": (3, 32, 32)}),
                       load_image("chelsea", {"input_size": (3, 32, 32)}))
    cfg = {"input_size": (3, 224, 224), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    x = load_image("coffee", cfg)
    assert x.shape == (1, 3, 224, 224) and -1.0 <= x.min() and x.max() <= 1.0
    torch.testing.assert_close(load_image("skimage:coffee", cfg), x)
    assert 0.0 <= denormalize(x, cfg).min() and denormalize(x, cfg).max() <= 1.0


def test_bad_images(tmp_path):
    with pytest.raises(CircuitlabError, match="no image file or sample"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(CircuitlabError, match="Did you mean 'coffee'"):
        load_image("cofee")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(CircuitlabError, match="cannot read"):
        load_image(tmp_path / "broken.png")
    with pytest.raises(CircuitlabError, match="is a folder"):
        load_image(tmp_path)
    with pytest.raises(CircuitlabError, match="holds no image files"):
        (tmp_path / "empty").mkdir()
        image_files(tmp_path / "empty")


def test_image_files_needs_a_folder(tmp_path):
    with pytest.raises(CircuitlabError, match="not a folder"):
        image_files(tmp_path / "missing")


def test_a_path_with_a_samples_name_is_read_with_a_warning(tmp_path, monkeypatch, capsys):
    """A folder called ``coffee`` here (say a previous run's --out) is what ``coffee`` reads,
    with one warning naming sample:coffee, which reads the photo."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "coffee").mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "coffee" / "mask.png")
    with pytest.warns(UserWarning, match="sample:coffee"):
        assert [p.name for p in image_files("coffee")] == ["mask.png"]
    with pytest.warns(UserWarning, match="sample:coffee"):
        with pytest.raises(CircuitlabError, match="is a folder"):
            load_image("coffee")
    photo = load_image("sample:coffee")
    assert photo.shape[1] == 3
    (tmp_path / "coffee" / "mask.png").unlink()
    (tmp_path / "coffee").rmdir()
    assert torch.equal(load_image("coffee"), photo)      # nothing here: the sample
    from circuitlab.cli import main
    (tmp_path / "coffee").mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "coffee" / "mask.png")
    main(["predict", "--model", "synthetic-cnn", "--image", "coffee"])
    warned = [ln for ln in capsys.readouterr().err.splitlines() if "sample:coffee" in ln]
    assert len(warned) == 1 and warned[0].startswith("circuitlab: warning:")
