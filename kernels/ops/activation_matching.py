"""Fused multi-layer activation-matching loss: sum_l alpha_l d_l(phi_l(x), phi_l(e)).

One call for every tapped layer, one kernel launch per layer. Each kernel reads the image's
and the explanation's activations in place (any strides: conv maps (B, C, H, W) and tokens
(B, N, C) are read as a (B, positions, channels) view), accumulates in fp32 and, in the same
launch, writes d loss / d phi(e) in phi(e)'s dtype; no z-scores, softmaxes or products are
materialised. All layers' partial sums land in one buffer, summed once. The backward scales
the gradients by the incoming one on the device, and touches no memory when it is 1 (fold
the loss weight into the alphas, as the explanation objective does). Why fused forward:
the host cost of launches, not bandwidth, bounds this loss at batch 1-8 (measured: eager and a
first two-pass version were flat from batch 8 to 64 on an H100).

- mse: one elementwise pass.
- zmse: one program per (sample, channel block) walks the positions twice: shifted moments
  (sum_p (za - zb)^2 = P (var_a / s_a^2 + var_b / s_b^2 - 2 cov / (s_a s_b))), then the
  gradient; the second read mostly hits L2.
- cosine, kl: one program per block of positions; a first loop over channels gathers the
  row statistics (dot and norms; online max and sum-exp for both softmaxes and the KL), a
  second one writes the gradient.
Semantics: ``circuitlab.kernels.reference.activation_distance``.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import reference as ref
from .._triton import next_pow2, tl, triton

if triton is not None:

    @triton.jit
    def _tile(X, pb, sxb, op, sxp, oc, sxc, m):
        """The (positions, channels) tile of sample pb as fp32 (zero outside the mask)."""
        return tl.load(X + pb * sxb + op[:, None] * sxp + oc[None, :] * sxc, mask=m,
                       other=0.0).to(tl.float32)

    @triton.jit
    def _put(G, pb, sgb, op, sgp, oc, sgc, g, m):
        """Store the fp32 tile g into G in G's dtype."""
        tl.store(G + pb * sgb + op[:, None] * sgp + oc[None, :] * sgc,
                 g.to(G.dtype.element_ty), mask=m)

    @triton.jit
    def _mse_kernel(A, B, G, PART, P, C, sab, sap, sac, sbb, sbp, sbc, sgb, sgp, sgc, lscale,
                    gscale, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                    WRITE_GRAD: tl.constexpr):
        pb = tl.program_id(0).to(tl.int64)
        pp = tl.program_id(1)
        pc = tl.program_id(2)
        op = pp * BLOCK_P + tl.arange(0, BLOCK_P)
        oc = pc * BLOCK_C + tl.arange(0, BLOCK_C)
        m = (op[:, None] < P) & (oc[None, :] < C)
        d = _tile(B, pb, sbb, op, sbp, oc, sbc, m) - _tile(A, pb, sab, op, sap, oc, sac, m)
        pid = (tl.program_id(0) * tl.num_programs(1) + pp) * tl.num_programs(2) + pc
        tl.store(PART + pid, tl.sum(tl.sum(d * d, axis=1), axis=0) * lscale)
        if WRITE_GRAD:
            _put(G, pb, sgb, op, sgp, oc, sgc, d * gscale, m)

    @triton.jit
    def _zmse_kernel(A, B, G, PART, P, C, sab, sap, sac, sbb, sbp, sbc, sgb, sgp, sgc, lscale,
                     gscale, eps, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                     WRITE_GRAD: tl.constexpr):
        # one program per (sample, block of channels) walks all positions twice: shifted
        # moments (by the channel's first value, so the variance does not cancel), then the
        # gradient. sum_p (za - zb)^2 = P (var_a / s_a^2 + var_b / s_b^2 - 2 cov / (s_a s_b))
        pb = tl.program_id(0).to(tl.int64)
        pc = tl.program_id(1)
        oc = pc * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = oc < C
        a0 = tl.load(A + pb * sab + oc * sac, mask=cm, other=0.0).to(tl.float32)
        b0 = tl.load(B + pb * sbb + oc * sbc, mask=cm, other=0.0).to(tl.float32)
        s1a = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
        s2a = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
        s1b = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
        s2b = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
        sx = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
        for p0 in range(0, P, BLOCK_P):
            op = p0 + tl.arange(0, BLOCK_P)
            m = (op[:, None] < P) & cm[None, :]
            a = _tile(A, pb, sab, op, sap, oc, sac, m)
            b = _tile(B, pb, sbb, op, sbp, oc, sbc, m)
            da = tl.where(m, a - a0[None, :], 0.0)
            db = tl.where(m, b - b0[None, :], 0.0)
            s1a += da
            s2a += da * da
            s1b += db
            s2b += db * db
            sx += da * db
        ma = tl.sum(s1a, axis=0) / P
        mb = tl.sum(s1b, axis=0) / P
        var_a = tl.maximum(tl.sum(s2a, axis=0) / P - ma * ma, 0.0)
        var_b = tl.maximum(tl.sum(s2b, axis=0) / P - mb * mb, 0.0)
        cov = tl.sum(sx, axis=0) / P - ma * mb
        sd_a = tl.sqrt(tl.maximum(var_a, 1e-20))
        sd_b = tl.sqrt(tl.maximum(var_b, 1e-20))
        s_a = sd_a + eps
        s_b = sd_b + eps
        col = var_a / (s_a * s_a) + var_b / (s_b * s_b) - 2.0 * cov / (s_a * s_b)
        tl.store(PART + tl.program_id(0) * tl.num_programs(1) + pc,
                 tl.sum(tl.where(cm, col, 0.0), axis=0) * lscale)
        if WRITE_GRAD:
            # d/db_p = gz (za_p - zb_p) + k (b_p - mu_b), gz = -2 alpha / (N s_b); k is the
            # path through mean and std (zero where the std is clamped)
            mua = a0 + ma
            mub = b0 + mb
            gz = -gscale / s_b
            k = gscale * (cov / (s_a * s_b) - var_b / (s_b * s_b)) / (sd_b * s_b)
            k = tl.where(var_b > 1e-20, k, 0.0)
            for p0 in range(0, P, BLOCK_P):
                op = p0 + tl.arange(0, BLOCK_P)
                m = (op[:, None] < P) & cm[None, :]
                a = _tile(A, pb, sab, op, sap, oc, sac, m)
                b = _tile(B, pb, sbb, op, sbp, oc, sbc, m)
                bc = b - mub[None, :]
                g = ((a - mua[None, :]) / s_a[None, :] - bc / s_b[None, :]) * gz[None, :] \
                    + bc * k[None, :]
                _put(G, pb, sgb, op, sgp, oc, sgc, g, m)

    @triton.jit
    def _cosine_kernel(A, B, G, PART, P, C, sab, sap, sac, sbb, sbp, sbc, sgb, sgp, sgc,
                       lscale, gscale, eps, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                       WRITE_GRAD: tl.constexpr):
        # PART gets -alpha/n sum cos; the host adds alpha once
        pb = tl.program_id(0).to(tl.int64)
        pp = tl.program_id(1)
        op = pp * BLOCK_P + tl.arange(0, BLOCK_P)
        pm = op < P
        dot = tl.zeros((BLOCK_P,), tl.float32)
        na2 = tl.zeros((BLOCK_P,), tl.float32)
        nb2 = tl.zeros((BLOCK_P,), tl.float32)
        for c0 in range(0, C, BLOCK_C):
            oc = c0 + tl.arange(0, BLOCK_C)
            m = pm[:, None] & (oc[None, :] < C)
            a = _tile(A, pb, sab, op, sap, oc, sac, m)
            b = _tile(B, pb, sbb, op, sbp, oc, sbc, m)
            dot += tl.sum(a * b, axis=1)
            na2 += tl.sum(a * a, axis=1)
            nb2 += tl.sum(b * b, axis=1)
        na = tl.maximum(tl.sqrt(na2), eps)
        nbr = tl.sqrt(nb2)
        nb = tl.maximum(nbr, eps)
        cos = dot / (na * nb)
        pid = tl.program_id(0) * tl.num_programs(1) + pp
        tl.store(PART + pid, tl.sum(tl.where(pm, cos, 0.0), axis=0) * lscale)
        if WRITE_GRAD:
            # d(-cos)/db = -(a / (na nb) - cos b / nb^2); a clamped norm is a constant
            ca = gscale / (na * nb)
            cb = tl.where(nbr >= eps, -gscale * cos / (nb * nb), 0.0)
            for c0 in range(0, C, BLOCK_C):
                oc = c0 + tl.arange(0, BLOCK_C)
                m = pm[:, None] & (oc[None, :] < C)
                a = _tile(A, pb, sab, op, sap, oc, sac, m)
                b = _tile(B, pb, sbb, op, sbp, oc, sbc, m)
                g = a * ca[:, None] + b * cb[:, None]
                _put(G, pb, sgb, op, sgp, oc, sgc, g, m)

    @triton.jit
    def _kl_kernel(A, B, G, PART, P, C, sab, sap, sac, sbb, sbp, sbc, sgb, sgp, sgc, lscale,
                   gscale, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                   WRITE_GRAD: tl.constexpr):
        # online softmax statistics of a and b over channels, and t = sum exp(a - ma) (a - b),
        # so KL = t / sa - lse(a) + lse(b) in one read
        pb = tl.program_id(0).to(tl.int64)
        pp = tl.program_id(1)
        op = pp * BLOCK_P + tl.arange(0, BLOCK_P)
        pm = op < P
        ma = tl.full((BLOCK_P,), float("-inf"), tl.float32)
        mb = tl.full((BLOCK_P,), float("-inf"), tl.float32)
        sa = tl.zeros((BLOCK_P,), tl.float32)
        sb = tl.zeros((BLOCK_P,), tl.float32)
        t = tl.zeros((BLOCK_P,), tl.float32)
        for c0 in range(0, C, BLOCK_C):
            oc = c0 + tl.arange(0, BLOCK_C)
            cm = oc[None, :] < C
            m = pm[:, None] & cm
            a = _tile(A, pb, sab, op, sap, oc, sac, m)
            b = _tile(B, pb, sbb, op, sbp, oc, sbc, m)
            diff = a - b                     # before masking: -inf - -inf would be nan
            a = tl.where(cm, a, float("-inf"))
            b = tl.where(cm, b, float("-inf"))
            na = tl.maximum(ma, tl.max(a, axis=1))
            nb = tl.maximum(mb, tl.max(b, axis=1))
            ea = tl.exp(a - na[:, None])
            ra = tl.exp(ma - na)
            sa = sa * ra + tl.sum(ea, axis=1)
            t = t * ra + tl.sum(ea * diff, axis=1)
            sb = sb * tl.exp(mb - nb) + tl.sum(tl.exp(b - nb[:, None]), axis=1)
            ma = na
            mb = nb
        kl = t / sa - (ma + tl.log(sa)) + (mb + tl.log(sb))
        pid = tl.program_id(0) * tl.num_programs(1) + pp
        tl.store(PART + pid, tl.sum(tl.where(pm, kl, 0.0), axis=0) * lscale)
        if WRITE_GRAD:
            ia = 1.0 / sa
            ib = 1.0 / sb
            for c0 in range(0, C, BLOCK_C):
                oc = c0 + tl.arange(0, BLOCK_C)
                m = pm[:, None] & (oc[None, :] < C)
                a = _tile(A, pb, sab, op, sap, oc, sac, m)
                b = _tile(B, pb, sbb, op, sbp, oc, sbc, m)
                g = (tl.exp(b - mb[:, None]) * ib[:, None]
                     - tl.exp(a - ma[:, None]) * ia[:, None]) * gscale
                _put(G, pb, sgb, op, sgp, oc, sgc, g, m)

    @triton.jit
    def _scale_kernel(G, S, n, BLOCK: tl.constexpr):
        # backward: grad *= d loss_total / d loss, read on the device (no host sync); a no-op
        # that touches no memory when it is 1, as it is when the weights sit in the alphas
        s = tl.load(S).to(tl.float32)
        if s != 1.0:
            o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            m = o < n
            g = tl.load(G + o, mask=m)
            tl.store(G + o, (g.to(tl.float32) * s).to(G.dtype.element_ty), mask=m)


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


def _plan(a3: torch.Tensor, b3: torch.Tensor, kind: str):
    """(grid, BLOCK_P, BLOCK_C) for one layer: tiles long along the contiguous axis."""
    nB, P, C = b3.shape
    pos_contig = b3.stride(1) == 1              # conv map (B, C, H, W): positions contiguous
    if kind == "mse":
        bp, bc = (128, 8) if pos_contig else (8, 128)
        return (nB, triton.cdiv(P, bp), triton.cdiv(C, bc)), bp, bc
    if kind == "zmse":
        bp, bc = (128, 4) if pos_contig else (16, 32)
        return (nB, triton.cdiv(C, bc)), bp, bc
    bp, bc = (32, 32) if pos_contig else (4, min(256, next_pow2(C)))
    return (nB, triton.cdiv(P, bp)), bp, bc


def layers_loss_and_grads(acts_x, acts_e, alphas, kinds, cdims, want):
    """(sum_l alpha_l d_l as an fp32 0-d tensor, [d/d phi_l(e) or None], flat gradient
    buffers) in one kernel launch per layer; every layer's partial sums go to one buffer,
    summed once."""
    plans, consts = [], 0.0
    for a, b, kind, cdim in zip(acts_x, acts_e, kinds, cdims):
        if kind not in ref.DISTANCES:
            raise ref.KernelInputError(f"unknown activation distance {kind!r}; use one of "
                                       f"{ref.DISTANCES}")
        if a.shape != b.shape:
            raise ref.KernelInputError(f"activation shapes differ: {tuple(a.shape)} vs "
                                       f"{tuple(b.shape)}")
        a3, b3 = ref.channels_last(a, cdim), ref.channels_last(b, cdim)
        grid, bp, bc = _plan(a3, b3, kind)
        n = 1
        for g in grid:
            n *= g
        plans.append((a3, b3, grid, bp, bc, n))
    part = torch.empty(sum(p[-1] for p in plans), dtype=torch.float32,
                       device=acts_e[0].device)
    bufs, flats = _grad_buffers(acts_e, cdims, want)
    grads, off = [], 0
    for (a3, b3, grid, bp, bc, n), (G, g3), kind, alpha, w in zip(plans, bufs, kinds, alphas,
                                                                  want):
        g3 = b3 if g3 is None else g3
        args = (a3, b3, g3, part[off:], b3.shape[1], b3.shape[2], *a3.stride(), *b3.stride(),
                *g3.stride())
        nB, P, C = b3.shape
        alpha = float(alpha)
        if kind == "mse":
            N = nB * P * C
            _mse_kernel[grid](*args, alpha / N, 2 * alpha / N, BLOCK_P=bp, BLOCK_C=bc,
                              WRITE_GRAD=w)
        elif kind == "zmse":
            N = nB * P * C
            _zmse_kernel[grid](*args, alpha / (nB * C), 2 * alpha / N, ref.EPS, BLOCK_P=bp,
                               BLOCK_C=bc, WRITE_GRAD=w)
        elif kind == "cosine":
            consts += alpha
            _cosine_kernel[grid](*args, -alpha / (nB * P), -alpha / (nB * P), ref.EPS,
                                 BLOCK_P=bp, BLOCK_C=bc, WRITE_GRAD=w)
        else:
            _kl_kernel[grid](*args, alpha / (nB * P), alpha / (nB * P), BLOCK_P=bp,
                             BLOCK_C=bc, WRITE_GRAD=w)
        off += n
        grads.append(G)
    total = part.sum()
    return (total + consts if consts else total), grads, flats


class ActivationMatching(torch.autograd.Function):
    """Forward computes every layer's loss and d/d phi(e) in the same pass; backward only
    scales them by the incoming gradient, on the device, one launch per gradient dtype."""

    @staticmethod
    def forward(ctx, alphas, kinds, cdims, n, *acts):
        xs = [t.detach() for t in acts[:n]]
        es = [t.detach() for t in acts[n:]]
        want = [bool(w) for w in ctx.needs_input_grad[4 + n:]]
        total, grads, flats = layers_loss_and_grads(xs, es, alphas, kinds, cdims, want)
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
        return (None, None, None, None, *([None] * ctx.n), *grads)


def activation_matching_triton(acts_x: Sequence[torch.Tensor], acts_e: Sequence[torch.Tensor],
                               alphas: Sequence[float], kinds: Sequence[str],
                               channel_dims: Sequence[int]) -> torch.Tensor:
    n = len(acts_e)
    if not (len(acts_x) == n == len(alphas) == len(kinds) == len(channel_dims)) or n == 0:
        raise ref.KernelInputError("activation matching needs one target, explanation, alpha, "
                                   "distance and channel dim per layer")
    return ActivationMatching.apply(tuple(alphas), tuple(kinds), tuple(channel_dims), n,
                                    *acts_x, *acts_e)
