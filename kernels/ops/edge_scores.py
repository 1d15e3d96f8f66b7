"""Edge scores ||W_{d,s}||_1 x E_s for chosen destination and source units, with a fused
top-k per destination.

One program per block of destinations reads the weight rows it needs straight from the conv
or linear weight (out, in / groups, *kernel), sums |W| over the kernel, drops pairs in
different groups (grouped and depthwise convs are block-diagonal), multiplies by the source
energy and, where asked, the destination's |d logit / d dst| (the gradient variant). With
``topk`` the whole row stays in registers and the k best sources are taken by repeated argmax
(the first index wins a tie, as a stable sort does). Semantics: ``reference.edge_scores``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .._triton import next_pow2, tl, triton

MAX_TOPK_SOURCES = 4096   # a row of scores held in registers for the fused top-k

if triton is not None:

    @triton.jit
    def _edge_kernel(W, E, SCALE, SRC, DST, L1, SC, TOPV, TOPI, n_dst, n_src, ksize, cin_g,
                     cout_g, swo, swi, swk, HAS_SCALE: tl.constexpr, TOPK: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
        pid = tl.program_id(0)
        od = pid * BLOCK_D + tl.arange(0, BLOCK_D)
        dm = od < n_dst
        d = tl.load(DST + od, mask=dm, other=0).to(tl.int64)
        if HAS_SCALE:
            dsc = tl.load(SCALE + d, mask=dm, other=0.0).to(tl.float32)
        else:
            dsc = tl.full((BLOCK_D,), 1.0, tl.float32)
        for s0 in range(0, n_src, BLOCK_S):
            os_ = s0 + tl.arange(0, BLOCK_S)
            sm = os_ < n_src
            s = tl.load(SRC + os_, mask=sm, other=0).to(tl.int64)
            e = tl.load(E + s, mask=sm, other=0.0).to(tl.float32)
            same = (d[:, None] // cout_g) == (s[None, :] // cin_g)
            m = dm[:, None] & sm[None, :] & same
            ptr = W + d[:, None] * swo + (s[None, :] % cin_g) * swi
            acc = tl.zeros((BLOCK_D, BLOCK_S), tl.float32)
            for k in range(0, ksize):
                acc += tl.abs(tl.load(ptr + k * swk, mask=m, other=0.0).to(tl.float32))
            sc = acc * e[None, :] * dsc[:, None]
            if TOPK == 0:
                out = od[:, None] * n_src + os_[None, :]
                om = dm[:, None] & sm[None, :]
                tl.store(L1 + out, acc, mask=om)
                tl.store(SC + out, sc, mask=om)
            else:
                # the wrapper guarantees one block holds the whole row
                work = tl.where(sm[None, :], sc, float("-inf"))
                cols = tl.arange(0, BLOCK_S)
                for i in tl.static_range(TOPK):
                    best = tl.max(work, axis=1)
                    idx = tl.argmax(work, axis=1, tie_break_left=True)
                    tl.store(TOPV + od * TOPK + i, best, mask=dm)
                    tl.store(TOPI + od * TOPK + i, idx.to(tl.int64), mask=dm)
                    work = tl.where(cols[None, :] == idx[:, None], float("-inf"), work)


def edge_scores_triton(weight: torch.Tensor, src_energy: torch.Tensor,
                       src_units: Sequence[int], dst_units: Sequence[int], groups: int = 1,
                       dst_scale: Optional[torch.Tensor] = None, topk: Optional[int] = None):
    # inputs (weight shape, groups, energies, unit ranges) are checked by
    # circuitlab.kernels.edge_scores
    dev = weight.device
    w = weight.detach()
    w3 = w.reshape(w.shape[0], w.shape[1], -1)                      # (out, in / groups, K)
    cout, cin_g, ksize = w3.shape
    s = torch.as_tensor(list(src_units), dtype=torch.long, device=dev)
    d = torch.as_tensor(list(dst_units), dtype=torch.long, device=dev)
    ns, nd = len(s), len(d)
    e = src_energy.detach().to(dev).contiguous()
    scale = dst_scale.detach().to(dev).contiguous() if dst_scale is not None else e
    k = 0 if topk is None else min(int(topk), ns)
    if topk is not None and (ns > MAX_TOPK_SOURCES or k == 0):
        l1, sc = edge_scores_triton(weight, src_energy, src_units, dst_units, groups,
                                    dst_scale)
        order = torch.sort(sc, dim=1, descending=True, stable=True)
        return order.values[:, :k], order.indices[:, :k]
    f32 = dict(dtype=torch.float32, device=dev)
    if k:
        BS = max(16, next_pow2(ns))
        BD = max(1, min(64, 8192 // BS))
        topv = torch.empty((nd, k), **f32)
        topi = torch.empty((nd, k), dtype=torch.long, device=dev)
        l1 = sc = topv  # unused by the kernel in this mode
    else:
        BS, BD = 64, 32
        l1 = torch.empty((nd, ns), **f32)
        sc = torch.empty((nd, ns), **f32)
        topv, topi = l1, l1
    if nd == 0 or ns == 0:
        return (topv, topi) if k else (l1, sc)
    grid = (triton.cdiv(nd, BD),)
    _edge_kernel[grid](w3, e, scale, s, d, l1, sc, topv, topi, nd, ns, ksize, cin_g,
                       cout // groups, *w3.stride(), HAS_SCALE=dst_scale is not None,
                       TOPK=k, BLOCK_D=BD, BLOCK_S=BS)
    return (topv, topi) if k else (l1, sc)
