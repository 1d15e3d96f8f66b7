"""Effective edges: the linearised contribution |sum_pos dD_d/dA_s * A_s| of each source unit
to each destination unit, where the modules between two taps do not compose into a weight.

All pairs come from one batched forward and backward where the taps cut the network
(``effective_edges``); pairs around a skip connection fall back to one at a time.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..hooked_model import HookedModel


def _run_copies(hm: HookedModel, x: torch.Tensor, k: int, names: Sequence[str], srcs,
                late: bool = True) -> tuple[dict, dict]:
    """Run ``k`` copies of x with every source in ``srcs`` replaced by a detached leaf:
    ({name: activation}, {source: leaf}).

    The copies only differ in what is back-propagated, so with ``late`` the layers before
    the first source run once and the batch is expanded there (on a CPU, where a batch of k
    costs k times one image, that saves the whole front of the network k - 1 times); a
    model that fixed its batch size earlier in its forward falls back to k copies of x."""
    held, leaves = {}, {}

    def hook(act, name):
        held[name] = act
        if name in srcs:
            leaf = act.detach()
            if leaf.shape[0] != k:
                leaf = leaf.expand(k, *leaf.shape[1:]).contiguous()
            leaves[name] = leaf.requires_grad_(True)
            return leaves[name]
        return act
    if late:
        try:
            hm.run_with_hooks(x, [(n, hook) for n in names])
            if all(t.shape[0] == k for n, t in held.items() if n not in srcs):
                return held, leaves
        except Exception:  # noqa: BLE001 -- any failure means: run the safe way
            pass
        held.clear()
        leaves.clear()
    hm.run_with_hooks(x.expand(k, *x.shape[1:]), [(n, hook) for n in names])
    return held, leaves


def _ordered(hm: HookedModel, names) -> list:
    order = {n: i for i, n in enumerate(hm.hook_points)}
    return sorted(dict.fromkeys(names), key=lambda n: order.get(n, len(order)))


@torch.no_grad()
def effective_pair(hm: HookedModel, x: torch.Tensor, src: str, dst: str,
               dst_units: Sequence[int]) -> torch.Tensor:
    """(len(dst_units), src units): |sum_pos dD_d/dA_s * A_s| for each chosen destination."""
    hs, hd = hm.point(src), hm.point(dst)
    k = len(dst_units)
    with torch.enable_grad():
        held, leaves = _run_copies(hm, x, k, _ordered(hm, [src, dst]), {src})
        d = hd.per_unit(held[dst])                     # (k, U_d, P)
        pick = d[torch.arange(k), torch.as_tensor(list(dst_units))].sum()
        (g,) = torch.autograd.grad(pick, leaves[src])
    a = leaves[src].detach()
    return (hs.per_unit(g * a).sum(-1)).abs()          # (k, U_s)


def _leaves(t: torch.Tensor) -> set:
    """ids of the leaf tensors that ``t``'s autograd graph reaches."""
    out, seen, stack = set(), set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if var is not None:
            out.add(id(var))
            continue
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return out


@torch.no_grad()
def effective_edges(hm: HookedModel, x: torch.Tensor, pairs) -> dict:
    """{(src, dst): (len(dst_units), src units)} effective edges for every pair at once.

    One forward of k copies of x (k = the most destination units of any pair) in which every
    source's output is replaced by a detached leaf, and one backward of the sum of all picked
    destinations: where each destination depends on no leaf but its own source (the tapped
    layers cut the network, as stage and block outputs do), the gradient at each source comes
    from its own destination alone and equals ``effective_pair``. Pairs that fail that check (a
    skip connection around a tap) are computed one at a time with ``effective_pair``.
    """
    k = max(len(u) for _, _, u in pairs)
    srcs = {s for s, _, _ in pairs}
    names = _ordered(hm, [n for s, d, _ in pairs for n in (s, d)])
    out, loose = {}, []
    with torch.enable_grad():
        held, leaves = _run_copies(hm, x, k, names, srcs)
        total, used = 0, []
        for src, dst, units in pairs:
            if _leaves(held[dst]) != {id(leaves[src])}:
                loose.append((src, dst, units))
                continue
            d = hm.point(dst).per_unit(held[dst])            # (k, U_d, P)
            n = len(units)
            total = total + d[torch.arange(n), torch.as_tensor(list(units))].sum()
            used.append((src, dst, n))
        if used:
            srcs_used = list(dict.fromkeys(s for s, _, _ in used))
            grads = dict(zip(srcs_used, torch.autograd.grad(total, [leaves[s]
                                                                      for s in srcs_used])))
            for src, dst, n in used:
                ga = grads[src] * leaves[src].detach()
                out[(src, dst)] = hm.point(src).per_unit(ga).sum(-1).abs()[:n]
    for src, dst, units in loose:
        out[(src, dst)] = effective_pair(hm, x, src, dst, units)
    return out
