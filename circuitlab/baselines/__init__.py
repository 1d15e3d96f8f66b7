"""Saliency baselines, all through the hooked model, each a map (B, 1, H, W) at input size.

>>> from circuitlab import baselines
>>> sal = baselines.saliency(hm, x, "gradcam")            # max 1 per image
>>> mask = baselines.binarize_at_area(sal, 0.05)          # every method at equal area
>>> baselines.methods_for(hm)                             # what applies to this model

Methods: ``gradcam``, ``gradcam++``, ``ig`` (Integrated Gradients), ``rise``, ``extremal``
(extremal perturbations, preserve mode, needs ``area``) and, for ViTs, ``rollout`` (attention
rollout) and ``cls_attention``. Keyword arguments go to the method.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch

from ..errors import CircuitlabError
from ..hooked_model import HookedModel
from ..metrics import binarize_at_area
from .attention import attention_rollout, cls_attention
from .cam import default_layer, grad_cam, grad_cam_pp
from .extremal import extremal_perturbation
from .gradients import integrated_gradients
from .rise import rise, rise_masks

METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "gradcam": grad_cam,
    "gradcam++": grad_cam_pp,
    "ig": integrated_gradients,
    "rise": rise,
    "extremal": extremal_perturbation,
    "rollout": attention_rollout,
    "cls_attention": cls_attention,
}
_VIT_ONLY = ("rollout", "cls_attention")


def methods_for(hm: HookedModel) -> list[str]:
    """The methods that apply to ``hm`` (attention maps only for ViTs)."""
    return [m for m in METHODS if hm.family.transformer or m not in _VIT_ONLY]


def saliency(hm: HookedModel, x: torch.Tensor, method: str, target=None, **kwargs
             ) -> torch.Tensor:
    """Run one method by name."""
    if method not in METHODS:
        raise CircuitlabError(f"unknown saliency method {method!r}; use one of "
                              f"{', '.join(METHODS)}")
    params = [p for p in inspect.signature(METHODS[method]).parameters
              if p not in ("hm", "x", "target")]
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise CircuitlabError(f"{method} has no setting {', '.join(unknown)}; it takes "
                              f"{', '.join(params)}")
    return METHODS[method](hm, x, target=target, **kwargs)


__all__ = ["METHODS", "attention_rollout", "binarize_at_area", "cls_attention", "default_layer",
           "extremal_perturbation", "grad_cam", "grad_cam_pp", "integrated_gradients",
           "methods_for", "rise", "rise_masks", "saliency"]
