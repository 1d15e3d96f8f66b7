"""Triton kernels against their torch reference: values and gradients, odd shapes, strides,
dtypes. On a CPU they run under TRITON_INTERPRET=1 (set in conftest.py before
circuitlab.kernels is imported), so shapes stay small; on a GPU the same tests run the compiled
kernels.
Select them with ``pytest -k kernel``."""
import os

import pytest
import torch

import circuitlab.kernels as kernels
from circuitlab.kernels import reference as R
from circuitlab.kernels._triton import triton

pytestmark = [pytest.mark.skipif(triton is None, reason="triton is not installed"),
              pytest.mark.kernel]
DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 before import", allow_module_level=True)

# (shape, channel dim): conv maps (B, C, H, W) and tokens (B, N, C), powers of two or not
SHAPES = [((2, 5, 7, 3), 1), ((1, 33, 4, 4), 1), ((3, 9, 6), 2), ((2, 16, 64), 2),
          ((1, 3, 1, 1), 1)]
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _both(a, b, kind, cdim, alpha=1.5, scale=1.0):
    """(loss, grad) from the Triton path and from the reference, for the same inputs."""
    out = []
    for backend in ("triton", "torch"):
        bb = b.detach().clone().requires_grad_(True)
        loss = kernels.activation_matching([a], [bb], [alpha], [kind], [cdim], backend=backend)
        (loss * scale).backward()
        out.append((loss.detach(), bb.grad))
    return out


def _close(x, y, tol):
    x, y = x.float(), y.float()
    assert torch.allclose(x, y, rtol=tol, atol=tol * max(1e-3, float(y.abs().max()))), \
        float((x - y).abs().max())


@pytest.mark.parametrize("kind", R.DISTANCES)
@pytest.mark.parametrize("shape,cdim", SHAPES)
def test_kernel_activation_matching_matches_reference(kind, shape, cdim):
    torch.manual_seed(0)
    a, b = torch.randn(shape, device=DEV), torch.randn(shape, device=DEV)
    (lt, gt), (lr, gr) = _both(a, b, kind, cdim)
    _close(lt, lr, 1e-5)
    _close(gt, gr, 1e-4)


@pytest.mark.parametrize("kind", R.DISTANCES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_activation_matching_half_inputs_fp32_accumulation(kind, dtype):
    torch.manual_seed(1)
    a = torch.randn(2, 6, 5, 3, device=DEV)                  # fp32 target, half explanation
    b = torch.randn(2, 6, 5, 3, device=DEV).to(dtype)
    (lt, gt), (lr, gr) = _both(a, b, kind, 1, scale=3.0)
    assert lt.dtype == torch.float32 and gt.dtype == dtype
    _close(lt, lr, 1e-5)                                     # both upcast: same fp32 loss
    _close(gt, gr, TOL[dtype])
    (lt2, _), (lr2, _) = _both(a.to(dtype), b, kind, 1)      # half on both sides
    _close(lt2, lr2, 1e-5)


@pytest.mark.parametrize("kind", R.DISTANCES)
def test_kernel_activation_matching_strided_inputs(kind):
    torch.manual_seed(2)
    base_a = torch.randn(4, 7, 5, 6, device=DEV)
    base_b = torch.randn(4, 7, 5, 6, device=DEV)
    # a batch slice with a step, a channels-last conv map, a transposed token tensor
    cases = [(base_a[::2], base_b[::2], 1),
             (base_a.contiguous(memory_format=torch.channels_last),
              base_b.contiguous(memory_format=torch.channels_last), 1),
             (base_a[:, :, 0].transpose(1, 2), base_b[:, :, 0].transpose(1, 2), 2)]
    for a, b, cdim in cases:
        (lt, gt), (lr, gr) = _both(a, b, kind, cdim, scale=2.0)
        _close(lt, lr, 1e-5)
        _close(gt, gr, 1e-4)
        assert gt.shape == b.shape


@pytest.mark.parametrize("launch", kernels.LAUNCHES)
def test_kernel_activation_matching_several_layers_and_grad_scale(launch):
    torch.manual_seed(3)
    xs = [torch.randn(2, 8, 6, 6, device=DEV), torch.randn(2, 16, 3, 3, device=DEV),
          torch.randn(2, 5, 12, device=DEV)]
    es = [torch.randn_like(t).requires_grad_(True) for t in xs]
    kinds, alphas, cdims = ["cosine", "zmse", "kl"], [1.0, 4.0, 8.0], [1, 1, 2]
    lt = kernels.activation_matching(xs, es, alphas, kinds, cdims, backend="triton",
                                     launch=launch)
    gt = torch.autograd.grad(lt * 2.5, es)
    lr = R.activation_matching(xs, es, alphas, kinds, cdims)
    gr = torch.autograd.grad(lr * 2.5, es)
    _close(lt.detach(), lr.detach(), 1e-5)
    for x, y in zip(gt, gr):
        _close(x, y, 1e-4)


@pytest.mark.parametrize("kind", R.DISTANCES)
def test_kernel_one_launch_reads_every_layer_from_its_table(kind):
    """Every shape of SHAPES (conv maps and tokens, odd sizes) plus a channels-last map in one
    launch, a layer that wants no gradient among them: the same loss and gradients as one
    launch per layer and as the reference."""
    torch.manual_seed(8)
    xs = [torch.randn(shape, device=DEV) for shape, _ in SHAPES] + [
        torch.randn(2, 7, 5, 6, device=DEV).contiguous(memory_format=torch.channels_last)]
    es = [torch.randn_like(x) for x in xs]
    cdims = [c for _, c in SHAPES] + [1]
    alphas = [float(i + 1) for i in range(len(xs))]
    kinds = [kind] * len(xs)
    wanted = [i for i in range(len(es)) if i != 2]
    out = {}
    for launch in (*kernels.LAUNCHES, None):
        e = [t.clone().requires_grad_(i in wanted) for i, t in enumerate(es)]
        loss = kernels.activation_matching(xs, e, alphas, kinds, cdims, launch=launch,
                                           backend="triton") if launch else \
            R.activation_matching(xs, e, alphas, kinds, cdims)
        grads = torch.autograd.grad(loss * 1.5, [e[i] for i in wanted])
        out[launch] = (loss.detach(), grads)
    for launch in kernels.LAUNCHES:
        _close(out[launch][0], out[None][0], 1e-5)
        for g, r in zip(out[launch][1], out[None][1]):
            _close(g, r, 1e-4)
    with pytest.raises(kernels.KernelInputError, match="launch"):
        kernels.activation_matching(xs, es, alphas, kinds, cdims, launch="all")


def test_kernel_activation_matching_zmse_constant_channel_and_no_grad():
    a = torch.randn(1, 3, 4, 4, device=DEV)
    b = a.clone()
    b[:, 1] = 2.0                                            # a constant channel: std clamped
    (lt, gt), (lr, gr) = _both(a, b, "zmse", 1)
    _close(lt, lr, 1e-5)
    _close(gt, gr, 1e-4)
    assert torch.isfinite(gt).all()
    with torch.no_grad():                                    # evaluation: no gradient written
        v = kernels.activation_matching([a], [b], [1.5], ["zmse"], [1], backend="triton")
    _close(v, lr, 1e-5)


def test_kernel_reference_gradcheck():
    torch.manual_seed(4)
    for kind in R.DISTANCES:
        for cdim, shape in ((1, (2, 3, 2, 2)), (2, (2, 3, 4))):
            a = torch.randn(shape, dtype=torch.double)
            b = torch.randn(shape, dtype=torch.double, requires_grad=True)
            assert torch.autograd.gradcheck(lambda bb: R.activation_distance(a, bb, kind, cdim),
                                            (b,), eps=1e-6, atol=1e-6)


def test_kernel_activation_matching_errors():
    a = torch.randn(1, 3, 4, 4, device=DEV)
    with pytest.raises(kernels.KernelInputError, match="shapes differ"):
        kernels.activation_matching([a], [a[:, :2]], [1.0], ["mse"], [1], backend="triton")
    with pytest.raises(kernels.KernelInputError, match="unknown activation distance"):
        kernels.activation_matching([a], [a], [1.0], ["l7"], [1], backend="triton")
    with pytest.raises(kernels.KernelInputError, match="backend"):
        kernels.activation_matching([a], [a], [1.0], ["mse"], [1], backend="cuda-please")


def test_kernel_dispatch():
    assert kernels.backend_for(torch.device("cpu")) == "torch"       # auto: torch off-GPU
    assert kernels.backend_for(torch.device("cpu"), "torch") == "torch"
    if torch.cuda.is_available():
        assert kernels.backend_for(torch.device("cuda")) == "triton"


def _grouped_weights():
    torch.manual_seed(5)
    return [(torch.randn(12, 6, 3, 3, device=DEV), 1),        # standard conv
            (torch.randn(12, 3, 3, 3, device=DEV), 4),        # grouped
            (torch.randn(12, 1, 5, 5, device=DEV), 12),       # depthwise
            (torch.randn(12, 6, 1, 1, device=DEV), 1),        # 1x1 projection
            (torch.randn(10, 6, device=DEV), 1)]              # linear


@pytest.mark.parametrize("case", range(5))
def test_kernel_edge_scores_match_reference(case):
    w, groups = _grouped_weights()[case]
    cin = w.shape[1] * groups
    e = torch.rand(cin, device=DEV)
    src = [0, 2, 3, cin - 1]
    dst = [1, 4, 5, 7, w.shape[0] - 1]
    scale = torch.rand(w.shape[0], device=DEV)
    for ds in (None, scale):
        l1, sc = kernels.edge_scores(w, e, src, dst, groups, ds, backend="triton")
        r1, rs = kernels.edge_scores(w, e, src, dst, groups, ds, backend="torch")
        _close(l1, r1, 1e-6)
        _close(sc, rs, 1e-6)
    # by hand for one pair: same group or zero
    d, s = dst[1], src[2]
    same = d // (w.shape[0] // groups) == s // w.shape[1]
    expect = w[d, s % w.shape[1]].abs().sum() * e[s] if same else 0.0
    assert float(sc[1, 2] / scale[d]) == pytest.approx(float(expect), rel=1e-5, abs=1e-7)


def test_kernel_edge_scores_topk_per_destination():
    torch.manual_seed(6)
    w = torch.randn(40, 37, 3, 3, device=DEV)
    e = torch.rand(37, device=DEV)
    e[5] = e[6] = 0.0                                         # ties at zero: lower index first
    src, dst = list(range(37)), [0, 3, 39]
    v, i = kernels.edge_scores(w, e, src, dst, topk=5, backend="triton")
    rv, ri = kernels.edge_scores(w, e, src, dst, topk=5, backend="torch")
    _close(v, rv, 1e-6)
    assert torch.equal(i.cpu(), ri.cpu())
    v, i = kernels.edge_scores(w, e, src, dst, topk=37, backend="triton")   # k = all
    rv, ri = kernels.edge_scores(w, e, src, dst, topk=37, backend="torch")
    assert torch.equal(i.cpu(), ri.cpu())


@pytest.mark.parametrize("launch", kernels.LAUNCHES)
def test_kernel_activation_matching_mixed_layouts_and_dtypes_in_one_call(launch):
    torch.manual_seed(7)
    xs = [torch.randn(2, 4, 5, 5, device=DEV), torch.randn(2, 6, 8, device=DEV),
          torch.randn(4, 3, 4, 4, device=DEV)[::2]]
    es = [xs[0].to(torch.bfloat16), xs[1] * 0.5, torch.randn(4, 3, 4, 4, device=DEV)[::2]]
    es = [e.detach().requires_grad_(True) for e in es]            # bf16, fp32, strided
    args = (["zmse", "kl", "cosine"], [1, 2, 1])
    lt = kernels.activation_matching(xs, es, [1.0, 2.0, 3.0], *args, backend="triton",
                                     launch=launch)
    gt = torch.autograd.grad(lt * 0.5, es)
    lr = R.activation_matching(xs, es, [1.0, 2.0, 3.0], *args)
    gr = torch.autograd.grad(lr * 0.5, es)
    _close(lt.detach(), lr.detach(), 1e-5)
    for x, y, e in zip(gt, gr, es):
        _close(x, y, TOL[e.dtype] if e.dtype in TOL else 1e-4)


def test_kernel_edge_scores_bad_input_is_one_clear_error():
    w = torch.randn(8, 2, 3, 3, device=DEV)                  # a conv with groups=2: 4 inputs
    e = torch.rand(4, device=DEV)
    for backend in ("triton", "torch"):
        with pytest.raises(kernels.KernelInputError, match="groups=1"):
            kernels.edge_scores(w, e, [0], [1], backend=backend)    # groups forgotten
        with pytest.raises(kernels.KernelInputError, match="source unit 7"):
            kernels.edge_scores(w, e, [7], [1], 2, backend=backend)
        with pytest.raises(kernels.KernelInputError, match="destination unit 8"):
            kernels.edge_scores(w, e, [0], [8], 2, backend=backend)


_COMPILE_FOR_H100 = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from circuitlab.kernels.ops import matching_kernels as mk
target = GPUTarget("cuda", 90, 32)
strides = {n: "i32" for n in ("sab", "sap", "sac", "sbb", "sbp", "sbc", "sgb", "sgp", "sgc")}
per_layer = {"A": "*fp32", "B": "*bf16", "G": "*bf16", "PART": "*fp32", "P": "i32", "C": "i32",
             **strides, "lscale": "fp32", "gscale": "fp32", "eps": "fp32",
             "BLOCK_P": "constexpr", "BLOCK_C": "constexpr", "WRITE_GRAD": "constexpr"}
for kernel in (mk._mse_kernel, mk._zmse_kernel, mk._cosine_kernel, mk._kl_kernel):
    sig = {k: v for k, v in per_layer.items()
           if k != "eps" or kernel in (mk._zmse_kernel, mk._cosine_kernel)}
    for grad in (True, False):
        triton.compile(ASTSource(fn=kernel, signature=sig, constexprs={
            "BLOCK_P": 32, "BLOCK_C": 32, "WRITE_GRAD": grad}), target=target)
one = {"TABLE": "*i64", "SCALES": "*fp32", "STARTS": "*i32", "PART": "*fp32", "n_layers": "i32",
       "eps": "fp32", "DA": "constexpr", "DB": "constexpr", "NCOL": "constexpr",
       "HAS": "constexpr", "BLOCKS_P": "constexpr", "BLOCKS_C": "constexpr"}
for da, db in ((0, 0), (0, 2), (1, 1)):
    triton.compile(ASTSource(fn=mk._all_layers_kernel, signature=one, constexprs={
        "DA": da, "DB": db, "NCOL": len(mk.TABLE_COLUMNS), "HAS": 255,
        "BLOCKS_P": mk.BLOCKS_P, "BLOCKS_C": mk.BLOCKS_C}), target=target)
print("compiled")
"""


@pytest.mark.slow
def test_kernel_sources_compile_for_an_h100():
    """The interpreter runs the kernels' arithmetic, not the compiler's type rules (a loop
    variable that changes type, a pointer cast): every kernel is compiled here for sm_90,
    through ptxas, as a GPU would compile it, without one."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (bin_dir / "ptxas").exists() and not shutil.which("ptxas"):
        pytest.skip("triton's NVIDIA backend (ptxas) is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE_FOR_H100], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]
