"""Circuits drawn for people: the layered PNG says what it shows, and the interactive HTML
view is self-contained and renders in a real browser."""
import base64
import io
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

import circuitlab
from circuitlab.circuits import read_circuit
from circuitlab.circuits.drawing import layout, unit_crops


@pytest.fixture(scope="module")
def drawn(cnn):
    hm, x, refs = cnn
    return hm, x, read_circuit(hm, x, reference=refs)


def test_the_png_names_layers_and_classes_and_says_which_edges_it_shows(drawn, tmp_path):
    hm, x, c = drawn
    ax = c.plot()
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks[:3] == list(hm.taps) and ticks[-2:] == ["pooled", "classes"]
    texts = [t.get_text() for t in ax.texts]
    top = c.meta["classes"][0]
    assert f"{hm.label(top['unit'])} ({top['prob']:.2f})" in texts
    assert ax.get_legend() is not None
    # the edges shown: per layer pair the fewest holding 80 % of its |score|, capped at
    # 300 / pairs; recomputed here with numpy
    shown, total_mass = 0, np.abs(c.edges["score"].to_numpy()).sum()
    kept_mass, pairs = 0.0, c.edges.groupby(["src_layer", "dst_layer"], sort=False)
    for _, g in pairs:
        s = np.sort(np.abs(g["score"].to_numpy()))[::-1]
        n = min(300 // pairs.ngroups, int((np.cumsum(s) / s.sum() < 0.8).sum()) + 1)
        shown, kept_mass = shown + n, kept_mass + s[:n].sum()
    caption = f"the strongest {shown} of {len(c.edges)}"
    assert any(caption in t for t in texts)
    assert any(f"{100 * kept_mass / total_mass:.0f} % of all |score|" in t for t in texts)
    assert len(layout(c)["edges"]) == shown
    c.plot(tmp_path / "c.png")
    assert Image.open(tmp_path / "c.png").size[0] > 600


def test_unit_crops_are_where_each_unit_fires(drawn):
    hm, x, c = drawn
    crops = unit_crops(hm, x, c)
    assert set(crops) == {(n, u) for n, us in c.units.items() for u in us}
    layer = hm.taps[-1]
    u = c.units[layer][0]
    _, cache = hm.run_with_cache(x, names=[layer])
    amap = cache[layer][0, u]
    h, w = amap.shape
    p = int(amap.flatten().argmax())
    img = circuitlab.data.denormalize(x, hm)[0].permute(1, 2, 0).numpy()
    H = img.shape[0]
    side = max(8, H // 4)
    cy, cx = int((p // w + 0.5) * H / h), int((p % w + 0.5) * H / w)
    y0, x0 = max(0, min(H - side, cy - side // 2)), max(0, min(H - side, cx - side // 2))
    want = (np.clip(img[y0:y0 + side, x0:x0 + side], 0, 1) * 255).astype(np.uint8)
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(
        crops[(layer, u)].split(",", 1)[1]))))
    assert got.shape == (64, 64, 3)
    assert np.array_equal(np.asarray(Image.fromarray(want).resize((64, 64), Image.NEAREST)),
                          got)


def test_the_html_view_is_self_contained_and_renders(drawn, tmp_path):
    hm, x, c = drawn
    path = c.to_html(tmp_path / "c.html", crops=unit_crops(hm, x, c))
    page = path.read_text()
    assert "cdn.bokeh.org" not in page and "<script src=" not in page     # JS inlined
    top = c.meta["classes"][0]
    assert f"{hm.label(top['unit'])} ({top['prob']:.2f})" in page
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or \
        shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium on this machine (apt install chromium)")
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                          "--virtual-time-budget=10000", "--dump-dom", path.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert 'data-circuit-view="ready"' in dom
