"""The Triton kernels of the activation-matching op (host side: ``activation_matching.py``).

Each distance is one tile body (``_mse_tile`` ...), a device function of the tile's indices,
called by two launchers: one kernel per layer (``_mse_kernel`` ...: the program id is the
tile), and ``_all_layers_kernel``, one launch for every layer of a dtype: a table holds each
layer's pointers, sizes, strides and scales, and a program finds its layer by its place in the
layers' program ranges. Every body writes its partial sum to ``PART[part]`` and, when asked,
d loss / d phi(e) into G in G's dtype.

- mse: one elementwise pass over a (positions, channels) tile.
- zmse: one program per (sample, channel block) walks the positions twice: shifted moments
  (sum_p (za - zb)^2 = P (var_a / s_a^2 + var_b / s_b^2 - 2 cov / (s_a s_b))), then the
  gradient; the second read mostly hits L2.
- cosine, kl: one program per block of positions; a first loop over channels gathers the
  row statistics (dot and norms; online max and sum-exp for both softmaxes and the KL), a
  second one writes the gradient.
"""
from __future__ import annotations

from .._triton import tl, triton

# the distances' codes in the layer table, and the tiles (BLOCK_P, BLOCK_C) of the one-launch
# kernel by (distance, positions contiguous): long along the contiguous axis
KIND_CODES = {"mse": 0, "zmse": 1, "cosine": 2, "kl": 3}
ONE_LAUNCH_TILES = {("mse", True): (128, 8), ("mse", False): (8, 128),
                    ("zmse", True): (128, 4), ("zmse", False): (16, 32),
                    ("cosine", True): (32, 32), ("cosine", False): (4, 128),
                    ("kl", True): (32, 32), ("kl", False): (4, 128)}
# the same tiles by block code 2 * kind + positions contiguous, as the kernel reads them
BLOCK_CODES = tuple((kind, bool(c % 2)) for kind in sorted(KIND_CODES, key=KIND_CODES.get)
                    for c in (0, 1))
BLOCKS_P = tuple(ONE_LAUNCH_TILES[b][0] for b in BLOCK_CODES)
BLOCKS_C = tuple(ONE_LAUNCH_TILES[b][1] for b in BLOCK_CODES)
# element types of the table's pointers, by code
DTYPE_CODES = ("float32", "float16", "bfloat16", "float64")
# the layer table's integer columns
TABLE_COLUMNS = ("a_ptr", "b_ptr", "g_ptr", "kind", "pos_contig", "want", "P", "C",
                 "sab", "sap", "sac", "sbb", "sbp", "sbc", "sgb", "sgp", "sgc")

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
    def _mse_tile(A, B, G, PART, part, pb, pp, pc, P, C, sab, sap, sac, sbb, sbp, sbc, sgb,
                  sgp, sgc, lscale, gscale, write_grad, BLOCK_P: tl.constexpr,
                  BLOCK_C: tl.constexpr):
        op = pp * BLOCK_P + tl.arange(0, BLOCK_P)
        oc = pc * BLOCK_C + tl.arange(0, BLOCK_C)
        m = (op[:, None] < P) & (oc[None, :] < C)
        d = _tile(B, pb, sbb, op, sbp, oc, sbc, m) - _tile(A, pb, sab, op, sap, oc, sac, m)
        tl.store(PART + part, tl.sum(tl.sum(d * d, axis=1), axis=0) * lscale)
        if write_grad:
            _put(G, pb, sgb, op, sgp, oc, sgc, d * gscale, m)

    @triton.jit
    def _zmse_tile(A, B, G, PART, part, pb, pc, P, C, sab, sap, sac, sbb, sbp, sbc, sgb, sgp,
                   sgc, lscale, gscale, eps, write_grad, BLOCK_P: tl.constexpr,
                   BLOCK_C: tl.constexpr):
        # moments shifted by the channel's first value, so the variance does not cancel
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
        tl.store(PART + part, tl.sum(tl.where(cm, col, 0.0), axis=0) * lscale)
        if write_grad:
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
    def _cosine_tile(A, B, G, PART, part, pb, pp, P, C, sab, sap, sac, sbb, sbp, sbc, sgb,
                     sgp, sgc, lscale, gscale, eps, write_grad, BLOCK_P: tl.constexpr,
                     BLOCK_C: tl.constexpr):
        # PART gets -alpha/n sum cos; the host adds alpha once
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
        tl.store(PART + part, tl.sum(tl.where(pm, cos, 0.0), axis=0) * lscale)
        if write_grad:
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
    def _kl_tile(A, B, G, PART, part, pb, pp, P, C, sab, sap, sac, sbb, sbp, sbc, sgb, sgp,
                 sgc, lscale, gscale, write_grad, BLOCK_P: tl.constexpr,
                 BLOCK_C: tl.constexpr):
        # online softmax statistics of a and b over channels, and t = sum exp(a - ma) (a - b),
        # so KL = t / sa - lse(a) + lse(b) in one read
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
        tl.store(PART + part, tl.sum(tl.where(pm, kl, 0.0), axis=0) * lscale)
        if write_grad:
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

    # ---------------------------------------------------------------- one kernel per layer
    @triton.jit
    def _mse_kernel(A, B, G, PART, P, C, sab, sap, sac, sbb, sbp, sbc, sgb, sgp, sgc, lscale,
                    gscale, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                    WRITE_GRAD: tl.constexpr):
        pp = tl.program_id(1)
        pc = tl.program_id(2)
        part = (tl.program_id(0) * tl.num_programs(1) + pp) * tl.num_programs(2) + pc
        _mse_tile(A, B, G, PART, part, tl.program_id(0).to(tl.int64), pp, pc, P, C, sab, sap,
                  sac, sbb, sbp, sbc, sgb, sgp, sgc, lscale, gscale, WRITE_GRAD,
                  BLOCK_P, BLOCK_C)

    @triton.jit
    def _zmse_kernel(A, B, G, PART, P, C, sab, sap, sac, sbb, sbp, sbc, sgb, sgp, sgc, lscale,
                     gscale, eps, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                     WRITE_GRAD: tl.constexpr):
        pc = tl.program_id(1)
        part = tl.program_id(0) * tl.num_programs(1) + pc
        _zmse_tile(A, B, G, PART, part, tl.program_id(0).to(tl.int64), pc, P, C, sab, sap, sac,
                   sbb, sbp, sbc, sgb, sgp, sgc, lscale, gscale, eps, WRITE_GRAD,
                   BLOCK_P, BLOCK_C)

    @triton.jit
    def _cosine_kernel(A, B, G, PART, P, C, sab, sap, sac, sbb, sbp, sbc, sgb, sgp, sgc,
                       lscale, gscale, eps, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                       WRITE_GRAD: tl.constexpr):
        pp = tl.program_id(1)
        part = tl.program_id(0) * tl.num_programs(1) + pp
        _cosine_tile(A, B, G, PART, part, tl.program_id(0).to(tl.int64), pp, P, C, sab, sap,
                     sac, sbb, sbp, sbc, sgb, sgp, sgc, lscale, gscale, eps, WRITE_GRAD,
                     BLOCK_P, BLOCK_C)

    @triton.jit
    def _kl_kernel(A, B, G, PART, P, C, sab, sap, sac, sbb, sbp, sbc, sgb, sgp, sgc, lscale,
                   gscale, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                   WRITE_GRAD: tl.constexpr):
        pp = tl.program_id(1)
        part = tl.program_id(0) * tl.num_programs(1) + pp
        _kl_tile(A, B, G, PART, part, tl.program_id(0).to(tl.int64), pp, P, C, sab, sap, sac,
                 sbb, sbp, sbc, sgb, sgp, sgc, lscale, gscale, WRITE_GRAD, BLOCK_P, BLOCK_C)

    # ---------------------------------------------------------------- one launch, all layers
    @triton.jit
    def _as_ptr(addr, CODE: tl.constexpr):
        """An address from the table as a pointer to elements of DTYPE_CODES[CODE]."""
        if CODE == 0:
            return addr.to(tl.pointer_type(tl.float32))
        elif CODE == 1:
            return addr.to(tl.pointer_type(tl.float16))
        elif CODE == 2:
            return addr.to(tl.pointer_type(tl.bfloat16))
        else:
            return addr.to(tl.pointer_type(tl.float64))

    @triton.jit
    def _layer_tile(A, B, G, PART, pid, local, P, C, sab, sap, sac, sbb, sbp, sbc, sgb, sgp,
                    sgc, lscale, gscale, eps, want, KIND: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """Tile ``local`` of one layer, decoded as the per-layer kernels' grids lay it out
        (mse: sample, position block, channel block; zmse: sample, channel block; cosine and
        kl: sample, position block); its partial sum goes to PART[pid]."""
        if KIND == 0:
            n_c = tl.cdiv(C, BLOCK_C)
            n_p = tl.cdiv(P, BLOCK_P)
            _mse_tile(A, B, G, PART, pid, (local // (n_c * n_p)).to(tl.int64),
                      (local // n_c) % n_p, local % n_c, P, C, sab, sap, sac, sbb, sbp, sbc,
                      sgb, sgp, sgc, lscale, gscale, want, BLOCK_P, BLOCK_C)
        elif KIND == 1:
            n_c = tl.cdiv(C, BLOCK_C)
            _zmse_tile(A, B, G, PART, pid, (local // n_c).to(tl.int64), local % n_c, P, C,
                       sab, sap, sac, sbb, sbp, sbc, sgb, sgp, sgc, lscale, gscale, eps, want,
                       BLOCK_P, BLOCK_C)
        elif KIND == 2:
            n_p = tl.cdiv(P, BLOCK_P)
            _cosine_tile(A, B, G, PART, pid, (local // n_p).to(tl.int64), local % n_p, P, C,
                         sab, sap, sac, sbb, sbp, sbc, sgb, sgp, sgc, lscale, gscale, eps,
                         want, BLOCK_P, BLOCK_C)
        else:
            n_p = tl.cdiv(P, BLOCK_P)
            _kl_tile(A, B, G, PART, pid, (local // n_p).to(tl.int64), local % n_p, P, C, sab,
                     sap, sac, sbb, sbp, sbc, sgb, sgp, sgc, lscale, gscale, want, BLOCK_P,
                     BLOCK_C)

    @triton.jit
    def _all_layers_kernel(TABLE, SCALES, STARTS, PART, n_layers, eps, DA: tl.constexpr,
                           DB: tl.constexpr, NCOL: tl.constexpr, HAS: tl.constexpr,
                           BLOCKS_P: tl.constexpr, BLOCKS_C: tl.constexpr):
        """Program ``pid`` is tile ``pid - STARTS[l]`` of layer l, where STARTS[l] <= pid <
        STARTS[l + 1]; its partial sum goes to PART[pid]. TABLE: one row of TABLE_COLUMNS
        per layer; SCALES: (loss scale, gradient scale) per layer. A holds elements of dtype
        code DA, B and G of DB (the gradient in phi(e)'s dtype). BLOCKS_P / BLOCKS_C: the
        tiles by block code (2 * kind + positions contiguous), as the host counted the
        programs."""
        pid = tl.program_id(0)
        layer = pid * 0
        for i in range(1, n_layers):
            layer += (pid >= tl.load(STARTS + i)).to(tl.int32)
        local = pid - tl.load(STARTS + layer)
        row = TABLE + layer * NCOL
        A = _as_ptr(tl.load(row + 0), DA)
        B = _as_ptr(tl.load(row + 1), DB)
        G = _as_ptr(tl.load(row + 2), DB)
        code = tl.load(row + 3) * 2 + (tl.load(row + 4) != 0).to(tl.int64)
        # one block per (distance, layout); HAS (bit = block code) compiles in only the
        # blocks this group uses: every block costs registers, and occupancy with them
        for c in tl.static_range(8):
            if (HAS >> c) & 1:
                if code == c:
                    _layer_tile(A, B, G, PART, pid, local, tl.load(row + 6),
                                tl.load(row + 7), tl.load(row + 8), tl.load(row + 9),
                                tl.load(row + 10), tl.load(row + 11), tl.load(row + 12),
                                tl.load(row + 13), tl.load(row + 14), tl.load(row + 15),
                                tl.load(row + 16), tl.load(SCALES + 2 * layer),
                                tl.load(SCALES + 2 * layer + 1), eps, tl.load(row + 5) != 0,
                                c // 2, BLOCKS_P[c], BLOCKS_C[c])

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
