"""The same runs on a CUDA device give the CPU's results (skipped where there is no GPU)."""
import pytest
import torch

import circuitlab
from helpers import FAMILY_MODELS, batch_for

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.gpu]


@pytest.fixture(autouse=True)
def exact_math():
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _pair(key):
    name, kwargs, size = FAMILY_MODELS[key]
    models = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        models.append(circuitlab.load_model(name, pretrained=False, device=device,
                                            data_config={"input_size": size}, **kwargs))
    return models


@pytest.mark.parametrize("key", ["timm_resnet18", "tv_resnet18", "vit"])
def test_cache_grads_and_interventions_match_cpu(key):
    cpu, gpu = _pair(key)
    x = batch_for(cpu)
    names = list(cpu.taps) + ["hook_pooled"]
    lc, cc = cpu.run_with_cache(x, names=names, grads=True)
    lg, cg = gpu.run_with_cache(x, names=names, grads=True)  # input moved to the GPU for us
    assert lg.device.type == "cuda" and cg[names[0]].device.type == "cuda"
    torch.testing.assert_close(lg.cpu(), lc, rtol=1e-4, atol=1e-4)
    for n in names:
        torch.testing.assert_close(cg[n].cpu(), cc[n], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(cg.grad(n).cpu(), cc.grad(n), rtol=1e-3, atol=1e-5)
    layer = cpu.taps[-1] if key != "vit" else "blocks.1.attn.hook_z"
    v = cpu.each_unit(layer, range(3))
    ref = batch_for(cpu, 4, seed=2)
    for ablation in ("zero", "mean", "resample"):
        a = cpu.ablate(x, v, ablation=ablation, reference=ref, seed=3)
        b = gpu.ablate(x, v, ablation=ablation, reference=ref, seed=3)
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gpu.patch(x, ref[:2], v).cpu(), cpu.patch(x, ref[:2], v),
                               rtol=1e-4, atol=1e-4)


def test_real_lite0_on_gpu():
    hm = circuitlab.load_model("efficientnet_lite0", device="cuda")
    top = hm.predict(circuitlab.data.load_image("coffee", hm), topk=1)
    assert top.loc[0, "label"] == "espresso" and top.loc[0, "probability"] > 0.9


def test_explain_and_metrics_on_gpu():
    from circuitlab import metrics, synthetic
    from circuitlab.explain import explain, preset
    torch.manual_seed(0)
    hm = circuitlab.HookedModel(synthetic.build("cnn"), data_config=synthetic.DATA_CONFIG)
    x = synthetic.make_dataset(4, seed=0).normalized()
    cfg = preset("default", hm.family.name, steps=5, min_steps=5, rob=1.0)
    cpu = explain(hm, x, cfg, seed=1)
    hm.to("cuda")
    gpu = explain(hm, x, cfg, seed=1)
    assert gpu.mask.device.type == "cuda"
    # the same seed gives the same masks up to float noise in a few flipped cells
    assert (gpu.mask.cpu() != cpu.mask).float().mean() < 0.05
    r = metrics.evaluate_mask(hm, x, gpu.mask, gpu.target)  # a target on the GPU too
    assert r["area_fraction"].shape == (4,)
    assert metrics.deletion_auc(hm, x, gpu.mask, gpu.target, steps=4).shape == (4,)


@pytest.mark.parametrize("execution", [dict(compile="reduce-overhead"), dict(precision="bf16"),
                                       dict(channels_last=True)])
def test_reader_settings_on_gpu(execution):
    """CUDA graphs, bf16 and channels-last reads against eager fp32 on the GPU; the masks an
    explanation finds with them keep the label as often (docs/cli.md measures how far they
    move)."""
    from circuitlab import synthetic
    from circuitlab.execution import Execution
    from circuitlab.explain import explain, preset
    torch.manual_seed(0)
    hm = circuitlab.HookedModel(synthetic.build("cnn"), data_config=synthetic.DATA_CONFIG)
    hm.to("cuda")
    x = synthetic.make_dataset(8, seed=0).normalized().cuda()
    names = list(hm.taps)
    le, ae = hm.reader(names)(x)
    lr, ar = hm.reader(names, Execution(**execution))(x)
    tol = 0.05 if execution.get("precision") == "bf16" else 1e-4
    torch.testing.assert_close(lr, le, rtol=tol, atol=tol * float(le.abs().max()))
    cfg = preset("default", hm.family.name, steps=40)
    base = explain(hm, x, cfg, seed=1)
    other = explain(hm, x, cfg, seed=1, execution=Execution(**execution))
    kept = [(hm(x * e.mask).argmax(-1) == e.target).float().mean() for e in (base, other)]
    assert float(kept[1]) >= float(kept[0]) - 0.125


def test_region_search_on_gpu():
    """The region search on the GPU (64 sets a forward, channels-last inside the search):
    masks that keep the label over the mean colour, mostly the CPU's (float noise may turn
    a greedy choice), and the model's layout put back."""
    from circuitlab import synthetic
    from circuitlab.explain.regions import RegionSearch, explain_regions
    torch.manual_seed(0)
    hm = circuitlab.HookedModel(synthetic.build("cnn"), data_config=synthetic.DATA_CONFIG)
    x = synthetic.make_dataset(4, seed=0).normalized()
    search = RegionSearch(segments=24, scores=(("logp", 0.6), ("margin", 0.6)))
    cpu = explain_regions(hm, x, search, seed=1)
    hm.to("cuda")
    gpu = explain_regions(hm, x, search, seed=1)
    assert gpu.mask.device.type == "cuda"
    assert all(p.is_contiguous() for p in hm.model.parameters())
    with torch.no_grad():
        kept = hm(gpu.mask * x.cuda()).argmax(-1) == gpu.target
    assert bool(kept[gpu.found.to(kept.device)].all())
    assert (gpu.mask.cpu() != cpu.mask).float().mean() < 0.25
