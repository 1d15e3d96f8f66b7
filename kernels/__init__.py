"""Fused ops of circuitlab, each a Triton kernel with a pure-torch reference of the same
semantics (``circuitlab.kernels.reference``).

The folder is the repository's top-level ``kernels/``, installed as ``circuitlab.kernels``
(pyproject's ``package-dir``): a top-level ``kernels`` would collide with the PyPI package of
that name. A leaf: it imports nothing of circuitlab but ``circuitlab.errors``.

>>> from circuitlab.kernels import activation_matching, edge_scores
>>> loss = activation_matching(acts_x, acts_e, alphas, kinds, channel_dims)
>>> l1, scores = edge_scores(conv.weight, energy, src_units, dst_units, conv.groups)

``backend`` picks the implementation: ``"auto"`` (default) uses Triton for CUDA tensors and the
torch reference elsewhere; ``"triton"`` or ``"torch"`` force one. The environment variable
``CIRCUITLAB_KERNELS=torch|triton|auto`` sets the default (``torch`` is the escape hatch if a
kernel misbehaves on your GPU). On a CPU, Triton runs only under its interpreter
(``TRITON_INTERPRET=1`` set before this package is imported), which the tests use.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from . import reference
from ._triton import INTERPRET, triton
from .reference import DISTANCES, LAUNCHES, KernelInputError

BACKENDS = ("auto", "triton", "torch")

__all__ = ["activation_matching", "edge_scores", "backend_for", "reference", "DISTANCES",
           "KernelInputError", "BACKENDS", "LAUNCHES"]


def backend_for(device: torch.device, backend: Optional[str] = None) -> str:
    """'triton' or 'torch' for tensors on ``device``."""
    choice = (backend or os.environ.get("CIRCUITLAB_KERNELS") or "auto").lower()
    if choice not in BACKENDS:
        raise KernelInputError(f"kernel backend {choice!r} is not one of {BACKENDS} (check "
                               f"CIRCUITLAB_KERNELS)")
    if choice == "torch":
        return "torch"
    if triton is None:
        if choice == "triton":
            raise KernelInputError("the triton backend needs the triton package (Linux, "
                                   "x86-64); use backend='torch'")
        return "torch"
    on_gpu = torch.device(device).type == "cuda"
    if choice == "auto":
        return "triton" if on_gpu else "torch"
    if not on_gpu and not INTERPRET:
        raise KernelInputError("Triton kernels on CPU tensors run only under the interpreter: "
                               "set TRITON_INTERPRET=1 before importing circuitlab.kernels, or use "
                               "backend='torch'")
    return "triton"


def activation_matching(acts_x: Sequence[torch.Tensor], acts_e: Sequence[torch.Tensor],
                        alphas: Sequence[float], kinds: Sequence[str],
                        channel_dims: Sequence[int],
                        backend: Optional[str] = None, launch: str = "per-layer") -> torch.Tensor:
    """sum_l alpha_l * d_l(phi_l(x), phi_l(e)) as an fp32 scalar; differentiable in acts_e.

    ``launch`` (Triton path): ``"per-layer"``, one kernel launch per layer, or ``"one"``, one
    launch for every layer of a dtype pair through a table of their pointers (fewer launches
    for many small layers; ``benchmarks/kernels.py`` times both).

    ``acts_x`` is the target (the image's run) and gets no gradient on the Triton path; pass
    it detached (the torch path is used where it requires grad, so nothing is lost silently).
    """
    if not acts_e:
        raise KernelInputError("activation matching needs at least one layer")
    if launch not in LAUNCHES:
        raise KernelInputError(f"launch is one of {LAUNCHES}; got {launch!r}")
    use = backend_for(acts_e[0].device, backend)
    if use == "triton" and not any(a.requires_grad for a in acts_x):
        from .ops.activation_matching import activation_matching_triton
        return activation_matching_triton(acts_x, acts_e, alphas, kinds, channel_dims, launch)
    return reference.activation_matching(acts_x, acts_e, alphas, kinds, channel_dims)


def edge_scores(weight: torch.Tensor, src_energy: torch.Tensor, src_units: Sequence[int],
                dst_units: Sequence[int], groups: int = 1,
                dst_scale: Optional[torch.Tensor] = None, topk: Optional[int] = None,
                backend: Optional[str] = None):
    """``(l1, scores)`` (len(dst), len(src)) or, with ``topk``, the ``topk`` best sources per
    destination ``(values, indices into src_units)``; see ``reference.edge_scores``."""
    _check_edges(weight, src_energy, src_units, dst_units, groups)
    if backend_for(weight.device, backend) == "triton":
        from .ops.edge_scores import edge_scores_triton
        return edge_scores_triton(weight, src_energy, src_units, dst_units, groups, dst_scale,
                                  topk)
    return reference.edge_scores(weight, src_energy, src_units, dst_units, groups, dst_scale,
                                 topk)


def _check_edges(weight, src_energy, src_units, dst_units, groups) -> None:
    if weight.dim() < 2:
        raise KernelInputError(f"edge scores need a conv or linear weight, got shape "
                               f"{tuple(weight.shape)}")
    if groups < 1 or weight.shape[0] % groups:
        raise KernelInputError(f"{weight.shape[0]} output units do not split into {groups} "
                               f"groups")
    n_in, n_out = weight.shape[1] * groups, weight.shape[0]
    if src_energy.numel() != n_in:
        raise KernelInputError(f"src_energy has {src_energy.numel()} entries but the weight "
                               f"reads {n_in} input units (groups={groups}); pass the source "
                               f"layer's energies and groups=conv.groups")
    for name, units, n in (("source", src_units, n_in), ("destination", dst_units, n_out)):
        bad = [int(u) for u in units if not 0 <= int(u) < n]
        if bad:
            raise KernelInputError(f"{name} unit {bad[0]} is out of range: the weight has {n} "
                                   f"{name} units (groups={groups})")
