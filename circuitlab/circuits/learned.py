"""Circuits chosen by optimisation: the units that must stay for the decision to survive when
every other unit of the tapped layers is ablated.

A gate g_u = sigmoid(theta_u) per unit mixes the activation with its ablated value,
g a + (1 - g) a_ablated, in every tapped layer at once. Adam maximises the *contrast* the
gated network keeps: its target logit on the image minus its mean target logit on reference
images, relative to the clean network's (``contrast_fraction`` in ``validate``), while a
hinge pushes the mean gate under a budget that shrinks from 1 to ``budget`` over the first
``soft_fraction`` of the steps; for the rest the forward uses the hard top-``budget`` mask
(straight-through gradients), so the optimiser sees the circuit it will return (a long hard
phase found better circuits than a long soft one on Lite0).

Why the contrast and not the image's logit alone: with mean ablation, a circuit can keep the
target logit of one image without reading the image at all (ablate the early layers
entirely, keep late units that turn the mean activation into the target class): on Lite0 /
coffee such a 10 % circuit kept 39 % of the logit and answered "espresso" for every input.
The contrast is zero for any circuit that ignores its input.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..deprecations import renamed
from ..errors import CircuitlabError
from ..hooked_model import HookedModel


CONTRAST_IMAGES = 8   # references run beside the image every step (the contrast's estimate)


@renamed(method="ablation")
def learn_units(hm: HookedModel, x: torch.Tensor, layers: Sequence[str], budget: float = 0.1,
                *, target: Optional[int] = None, ablation: str = "mean",
                reference: Optional[torch.Tensor] = None, steps: int = 300, lr: float = 0.1,
                soft_fraction: float = 0.2, contrast_images: int = CONTRAST_IMAGES,
                seed: int = 0, init: Optional[dict] = None,
                progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """{layer: [units]} holding ``budget`` of all units of ``layers`` (at least one).
    ``progress(step, steps)`` is called after every step.

    ``reference`` images define the mean ablation and the contrast (the first
    ``contrast_images`` of them run beside x every step). ``init`` ({layer: [units]}, a
    circuit found otherwise) starts the gates open on its units and closed elsewhere, and the
    budget then shrinks from its size instead of from all units."""
    _check(budget, ablation, reference, steps)
    torch.manual_seed(seed)
    layers = list(layers)
    axes = {n: hm.point(n).unit_axis for n in layers}
    sizes = {n: hm.n_units(n) for n in layers}
    keep_n = max(1, int(round(budget * sum(sizes.values()))))
    reference = reference.to(x.device)
    batch = torch.cat([x, reference[:contrast_images]])
    ablated, y, contrast0 = _clean_run(hm, x, reference, layers, ablation, target,
                                       contrast_images)
    theta, start = _logits(sizes, budget, init, x.device)
    opt = torch.optim.Adam(theta.values(), lr=lr)
    hard: dict = {}

    def gate(name):
        def fn(act, _name):
            g = torch.sigmoid(theta[name])
            if hard:
                g = hard[name] + g - g.detach()          # straight-through
            shape = [1] * act.dim()
            shape[axes[name]] = -1
            g = g.view(shape)
            base = ablated[name]
            return g * act if base is None else g * act + (1 - g) * base
        return fn
    hooks = [(n, gate(n)) for n in layers]
    soft_steps = int(soft_fraction * steps)
    for step in range(steps):
        hard.clear()
        if step >= soft_steps:
            hard.update(_top(theta, layers, keep_n))
        area = start - min(1.0, (step + 1) / max(1, soft_steps)) * (start - budget)
        z = hm.run_with_hooks(batch, hooks)[:, y]
        kept = (z[0] - z[1:].mean()) / contrast0
        mean_gate = torch.cat([torch.sigmoid(theta[n]) for n in layers]).mean()
        loss = torch.relu(1 - kept) + 200 * torch.relu(mean_gate - area)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress:
            progress(step + 1, steps)
    masks = _top(theta, layers, keep_n)
    return {n: torch.nonzero(masks[n]).flatten().tolist() for n in layers}


def _check(budget: float, ablation: str, reference, steps: int) -> None:
    if not 0 < budget <= 1:
        raise CircuitlabError("budget must lie in (0, 1]: the fraction of the tapped units")
    if ablation not in ("mean", "zero"):
        raise CircuitlabError("learned circuits ablate with 'mean' or 'zero'")
    if reference is None or len(reference) == 0:
        raise CircuitlabError("learned circuits need reference images (the mean ablation and "
                              "the contrast): pass reference=<batch (R, C, H, W)>")
    if steps < 10:
        raise CircuitlabError("learning a circuit takes at least 10 steps")


def _logits(sizes: dict, budget: float, init: Optional[dict], device) -> tuple:
    """({layer: gate logits}, the kept fraction the budget shrinks from): every gate open,
    or with ``init`` open on its units only and shrinking from its size."""
    theta = {n: torch.full((k,), 3.0, device=device) for n, k in sizes.items()}
    start = 1.0
    if init is not None:
        for n in sizes:
            theta[n].fill_(-3.0)[torch.as_tensor(list(init.get(n, [])), dtype=torch.long)] = 3.0
        start = max(budget, sum(len(init.get(n, [])) for n in sizes) / sum(sizes.values()))
    for t in theta.values():
        t.requires_grad_(True)
    return theta, start


@torch.no_grad()
def _clean_run(hm, x, reference, layers, ablation, target, contrast_images) -> tuple:
    """(the ablation values per layer, the target class, the clean image-vs-reference
    contrast) from one run of the references and one of the image."""
    logits_ref, rc = hm.run_with_cache(reference, names=layers)
    ablated = {n: rc[n].mean(0, keepdim=True) if ablation == "mean" else None for n in layers}
    logits_x = hm(x)[0]          # the references' clean logits come from the run above
    y = int(logits_x.argmax()) if target is None else int(target)
    contrast0 = logits_x[y] - logits_ref[:contrast_images, y].mean()
    if float(contrast0) <= 0:
        raise CircuitlabError("the reference images score the target class as high as the "
                              "image itself; pass references of other classes")
    return ablated, y, contrast0


def _top(theta: dict, layers: list, k: int) -> dict:
    flat = torch.cat([theta[n].detach() for n in layers])
    keep = torch.zeros_like(flat)
    keep[flat.topk(k).indices] = 1
    out, off = {}, 0
    for n in layers:
        m = theta[n].numel()
        out[n] = keep[off:off + m]
        off += m
    return out
