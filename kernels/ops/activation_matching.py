"""Fused multi-layer activation-matching loss: sum_l alpha_l d_l(phi_l(x), phi_l(e)).

One call for every tapped layer: one kernel launch per layer (``launch="per-layer"``) or one
launch for all of them (``launch="one"``: a table of the layers' pointers, sizes and strides,
one launch per dtype pair). Each kernel reads the image's and the explanation's activations in
place (any strides: conv maps (B, C, H, W) and tokens (B, N, C) are read as a (B, positions,
channels) view), accumulates in fp32 and, in the same launch, writes d loss / d phi(e) in
phi(e)'s dtype; no z-scores, softmaxes or products are materialised. All layers' partial sums
land in one buffer, summed once. The backward scales the gradients by the incoming one on the
device, and touches no memory when it is 1 (fold the loss weight into the alphas, as the
explanation objective does). Why fused forward: the host cost of launches, not bandwidth,
bounds this loss at batch 1-8 (measured: eager and a first two-pass version were flat from
batch 8 to 64 on an H100); the one-launch form takes that further.
The kernels: ``matching_kernels.py``. Semantics: ``circuitlab.kernels.reference.activation_distance``.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from .. import reference as ref
from .._triton import next_pow2, triton
from .matching_kernels import (BLOCKS_C, BLOCKS_P, DTYPE_CODES, KIND_CODES, ONE_LAUNCH_TILES,
                               TABLE_COLUMNS, _all_layers_kernel, _cosine_kernel, _kl_kernel,
                               _mse_kernel, _scale_kernel, _zmse_kernel)


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or (t.dim() == 4 and
                                 t.is_contiguous(memory_format=torch.channels_last))


def _grad_buffers(acts_e, cdims, want):
    """Per layer (G, G as a (B, P, C) view), each G laid out like phi(e) so both are walked
    along the same contiguous axis. Dense layers share one flat buffer per dtype, so the
    backward scales all of them in one launch; the flat buffers are returned too."""
    sizes = {}
    for b, w in zip(acts_e, want):
        if w and _dense(b):
            sizes[b.dtype] = sizes.get(b.dtype, 0) + b.numel()
    flats = {dt: torch.empty(n, dtype=dt, device=acts_e[0].device) for dt, n in sizes.items()}
    offs = dict.fromkeys(flats, 0)
    out = []
    for b, cdim, w in zip(acts_e, cdims, want):
        if not w:
            out.append((None, None))
            continue
        if _dense(b):
            o = offs[b.dtype]
            g = flats[b.dtype][o:o + b.numel()].as_strided(b.shape, b.stride())
            offs[b.dtype] = o + b.numel()
        else:
            g = torch.empty_like(b)
        g3 = ref.channels_last(g, cdim)
        if g3.untyped_storage().data_ptr() != g.untyped_storage().data_ptr():
            # no (B, P, C) view of this layout: write a contiguous (B, P, C) buffer instead
            g3 = torch.empty((b.shape[0], g3.shape[1], g3.shape[2]), dtype=b.dtype,
                             device=b.device)
            g = g3.view(list(b.movedim(cdim, -1).shape)).movedim(-1, cdim)
        out.append((g, g3))
    return out, list(flats.values())


def _scales(kind: str, alpha: float, nB: int, P: int, C: int) -> tuple:
    """(loss scale, gradient scale, constant added on the host) of one layer."""
    N = nB * P * C
    if kind == "mse":
        return alpha / N, 2 * alpha / N, 0.0
    if kind == "zmse":
        return alpha / (nB * C), 2 * alpha / N, 0.0
    if kind == "cosine":                     # the kernel sums -cos; 1 - cos is added here
        return -alpha / (nB * P), -alpha / (nB * P), alpha
    return alpha / (nB * P), alpha / (nB * P), 0.0


def _grid(kind: str, nB: int, P: int, C: int, bp: int, bc: int) -> tuple:
    """The tiles of one layer: (sample, position block, channel block) for mse, (sample,
    channel block) for zmse, (sample, position block) for cosine and kl."""
    if kind == "mse":
        return nB, triton.cdiv(P, bp), triton.cdiv(C, bc)
    if kind == "zmse":
        return nB, triton.cdiv(C, bc)
    return nB, triton.cdiv(P, bp)


def _tiles(b3: torch.Tensor, kind: str, one_launch: bool) -> tuple:
    """(BLOCK_P, BLOCK_C): long along the contiguous axis; the one-launch kernel's are fixed
    per (distance, layout), the per-layer kernels' token cosine / kl tile spans C."""
    pos_contig = b3.stride(1) == 1              # conv map (B, C, H, W): positions contiguous
    if one_launch or kind in ("mse", "zmse") or pos_contig:
        return ONE_LAUNCH_TILES[(kind, pos_contig)]
    return 4, min(256, next_pow2(b3.shape[2]))


class _Layer(NamedTuple):
    a3: torch.Tensor           # phi(x) as a (B, positions, channels) view
    b3: torch.Tensor           # phi(e), the same
    kind: str
    tiles: tuple               # (BLOCK_P, BLOCK_C)
    grid: tuple
    programs: int              # prod(grid): its partial sums
    lscale: float
    gscale: float
    const: float               # added to the loss on the host


def _layers(acts_x, acts_e, alphas, kinds, cdims, one_launch: bool) -> list:
    """Each layer's views, tiles, grid and scales (``_Layer``)."""
    out = []
    for a, b, kind, cdim, alpha in zip(acts_x, acts_e, kinds, cdims, alphas):
        if kind not in ref.DISTANCES:
            raise ref.KernelInputError(f"unknown activation distance {kind!r}; use one of "
                                       f"{ref.DISTANCES}")
        if a.shape != b.shape:
            raise ref.KernelInputError(f"activation shapes differ: {tuple(a.shape)} vs "
                                       f"{tuple(b.shape)}")
        a3, b3 = ref.channels_last(a, cdim), ref.channels_last(b, cdim)
        tiles = _tiles(b3, kind, one_launch)
        grid = _grid(kind, *b3.shape, *tiles)
        n = 1
        for g in grid:
            n *= g
        out.append(_Layer(a3, b3, kind, tiles, grid, n,
                          *_scales(kind, float(alpha), *b3.shape)))
    return out


def _launch_per_layer(layers, bufs, want, dev) -> list:
    """One launch per layer; all partial sums in one buffer."""
    part = torch.empty(sum(layer.programs for layer in layers), dtype=torch.float32,
                       device=dev)
    off = 0
    for layer, (_, g3), w in zip(layers, bufs, want):
        a3, b3 = layer.a3, layer.b3
        g3 = b3 if g3 is None else g3
        args = (a3, b3, g3, part[off:], b3.shape[1], b3.shape[2], *a3.stride(), *b3.stride(),
                *g3.stride(), layer.lscale, layer.gscale)
        kernel = {"mse": _mse_kernel, "zmse": _zmse_kernel, "cosine": _cosine_kernel,
                  "kl": _kl_kernel}[layer.kind]
        eps = (ref.EPS,) if layer.kind in ("zmse", "cosine") else ()
        kernel[layer.grid](*args, *eps, BLOCK_P=layer.tiles[0], BLOCK_C=layer.tiles[1],
                           WRITE_GRAD=w)
        off += layer.programs
    return [part]


def _dtype_code(dtype: torch.dtype) -> int:
    return DTYPE_CODES.index(str(dtype).split(".")[-1])


def _launch_one(layers, bufs, want, dev) -> list:
    """One launch per (phi(x) dtype, phi(e) dtype) for all its layers, through a table of
    their pointers, sizes and strides (copied to the device without a host sync); one
    buffer of partial sums per launch."""
    groups: dict = {}
    for i, layer in enumerate(layers):
        groups.setdefault((layer.a3.dtype, layer.b3.dtype), []).append(i)
    parts = []
    for (da, db), members in groups.items():
        table, scales, starts, has = [], [], [0], 0
        for i in members:
            layer, b3 = layers[i], layers[i].b3
            g3 = b3 if bufs[i][1] is None else bufs[i][1]
            code = 2 * KIND_CODES[layer.kind] + int(b3.stride(1) == 1)
            table.append([layer.a3.data_ptr(), b3.data_ptr(), g3.data_ptr(),
                          KIND_CODES[layer.kind], int(b3.stride(1) == 1), int(want[i]),
                          b3.shape[1], b3.shape[2], *layer.a3.stride(), *b3.stride(),
                          *g3.stride()])
            scales += [layer.lscale, layer.gscale]
            starts.append(starts[-1] + layer.programs)
            has |= 1 << code
        host = [torch.tensor(table, dtype=torch.int64), torch.tensor(scales, dtype=torch.float32),
                torch.tensor(starts, dtype=torch.int32)]
        if dev.type == "cuda":
            host = [t.pin_memory().to(dev, non_blocking=True) for t in host]
        part = torch.empty(starts[-1], dtype=torch.float32, device=dev)
        _all_layers_kernel[(starts[-1],)](*host, part, len(members), ref.EPS,
                                          DA=_dtype_code(da), DB=_dtype_code(db),
                                          NCOL=len(TABLE_COLUMNS), HAS=has,
                                          BLOCKS_P=BLOCKS_P, BLOCKS_C=BLOCKS_C)
        parts.append(part)
    return parts


def layers_loss_and_grads(acts_x, acts_e, alphas, kinds, cdims, want, launch="per-layer"):
    """(sum_l alpha_l d_l as an fp32 0-d tensor, [d/d phi_l(e) or None], flat gradient
    buffers) in one kernel launch per layer or one for all (``launch="one"``); the partial
    sums are summed once per launch buffer."""
    one = launch == "one"
    layers = _layers(acts_x, acts_e, alphas, kinds, cdims, one)
    bufs, flats = _grad_buffers(acts_e, cdims, want)
    parts = (_launch_one if one else _launch_per_layer)(layers, bufs, want,
                                                        acts_e[0].device)
    total = parts[0].sum() if len(parts) == 1 else torch.cat(parts).sum()
    consts = sum(layer.const for layer in layers)
    return (total + consts if consts else total), [g for g, _ in bufs], flats


class ActivationMatching(torch.autograd.Function):
    """Forward computes every layer's loss and d/d phi(e) in the same pass; backward only
    scales them by the incoming gradient, on the device, one launch per gradient dtype."""

    @staticmethod
    def forward(ctx, alphas, kinds, cdims, launch, n, *acts):
        xs = [t.detach() for t in acts[:n]]
        es = [t.detach() for t in acts[n:]]
        want = [bool(w) for w in ctx.needs_input_grad[5 + n:]]
        total, grads, flats = layers_loss_and_grads(xs, es, alphas, kinds, cdims, want, launch)
        ctx.n = n
        ctx.grads, ctx.flats = grads, flats
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grads, flats = ctx.grads, ctx.flats
        ctx.grads = ctx.flats = None
        s = grad_out.detach().reshape(1).float().contiguous()
        in_flat = set()
        for f in flats:
            _scale_kernel[(triton.cdiv(f.numel(), 4096),)](f, s, f.numel(), BLOCK=4096)
            in_flat.add(f.untyped_storage().data_ptr())
        for g in grads:
            if g is not None and g.untyped_storage().data_ptr() not in in_flat:
                g.mul_(s.to(g.dtype))
        return (None, None, None, None, None, *([None] * ctx.n), *grads)


def activation_matching_triton(acts_x: Sequence[torch.Tensor], acts_e: Sequence[torch.Tensor],
                               alphas: Sequence[float], kinds: Sequence[str],
                               channel_dims: Sequence[int],
                               launch: str = "per-layer") -> torch.Tensor:
    n = len(acts_e)
    if not (len(acts_x) == n == len(alphas) == len(kinds) == len(channel_dims)) or n == 0:
        raise ref.KernelInputError("activation matching needs one target, explanation, alpha, "
                                   "distance and channel dim per layer")
    if launch not in ref.LAUNCHES:
        raise ref.KernelInputError(f"launch is one of {ref.LAUNCHES}; got {launch!r}")
    return ActivationMatching.apply(tuple(alphas), tuple(kinds), tuple(channel_dims), launch,
                                    n, *acts_x, *acts_e)
