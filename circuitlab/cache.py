"""ActivationCache: what one ``run_with_cache`` recorded, indexed like a dict; the estimate
that warns before a cache grows large, and the move of saved tensors to another device."""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Iterator, Optional

import torch

from .errors import CircuitlabError, did_you_mean

# a cache above this many bytes is warned about (it is easy to ask for every hook point)
CACHE_WARN_BYTES = 2 * 2 ** 30


def warn_if_large(points, x: torch.Tensor, grads: bool) -> None:
    """Warn when caching ``points`` (hook points: their ``shape`` at batch 1) for ``x``
    would hold more than CACHE_WARN_BYTES."""
    per_image = sum(math.prod(p.shape[1:]) for p in points if p.shape)
    size = per_image * x.shape[0] * x.element_size() * (2 if grads else 1)
    if size > CACHE_WARN_BYTES:
        warnings.warn(f"caching {len(points)} hook points of a batch of {x.shape[0]} holds "
                      f"about {size / 2 ** 30:.1f} GiB; pass names= (e.g. hm.taps) to cache "
                      f"only what you need", stacklevel=3)


def on_device(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` moved to ``device`` (None: left where it is)."""
    return t if device is None else t.to(device)




class ActivationCache(Mapping):
    """Activations by hook name; with ``grads=True`` also d(target)/d(activation).

    >>> logits, cache = hm.run_with_cache(x, names=["layer3", "layer4"], grads=True)
    >>> cache["layer3"].shape, cache.grad("layer3").shape, cache.target
    """

    def __init__(self, activations: dict[str, torch.Tensor], logits: torch.Tensor,
                 grads: Optional[dict[str, torch.Tensor]] = None,
                 target: Optional[torch.Tensor] = None):
        self._acts = activations
        self._grads = grads
        self.logits = logits
        self.target = target  # class index per sample that the gradients are taken of

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._acts[name]
        except KeyError:
            raise CircuitlabError(f"{name!r} is not in this cache; it holds {len(self._acts)} "
                                  f"hook points.{did_you_mean(name, self._acts)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._acts)

    def __len__(self) -> int:
        return len(self._acts)

    @property
    def grads(self) -> Mapping[str, torch.Tensor]:
        if self._grads is None:
            raise CircuitlabError("this cache holds no gradients: call run_with_cache(..., "
                                  "grads=True)")
        return self._grads

    def grad(self, name: str) -> torch.Tensor:
        grads = self.grads
        if name not in grads:
            self[name]  # raises the helpful error for unknown names
        return grads[name]

    def to(self, device) -> "ActivationCache":
        move = {k: v.to(device) for k, v in self._acts.items()}
        grads = None if self._grads is None else {k: v.to(device) for k, v in self._grads.items()}
        target = None if self.target is None else self.target.to(device)
        return ActivationCache(move, self.logits.to(device), grads, target)

    def detach(self) -> "ActivationCache":
        acts = {k: v.detach() for k, v in self._acts.items()}
        grads = None if self._grads is None else {k: v.detach() for k, v in self._grads.items()}
        return ActivationCache(acts, self.logits.detach(), grads, self.target)

    def nbytes(self) -> int:
        tensors = list(self._acts.values()) + list((self._grads or {}).values())
        return sum(t.numel() * t.element_size() for t in tensors)

    def __repr__(self) -> str:
        items = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in list(self._acts.items())[:6])
        more = "" if len(self) <= 6 else f", ... ({len(self)} in all)"
        return f"ActivationCache({items}{more}, grads={self._grads is not None})"
