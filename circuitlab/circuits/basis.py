"""Circuits over sparse dictionary features instead of a layer's own units.

``FeatureAblated`` is the ``ranking.Ablated`` of a feature basis (``circuitlab.features``):
at each tapped layer the activation a is encoded into its features f and its reconstruction
error err = a - decode(f), and the layer's units become the m features plus one error node
(the last index). Keeping a circuit runs

    a' = decode(f') + c err + (1 - c) mean(err)

with f' the kept features (the others at their ablated value: the reference mean per
position, or zero) and c = 1 when the error node is kept, 0 when not. With everything kept
this is the clean network exactly. Attribution scores the error node by its coefficient
c (from 0 to 1): sum_pos (err - mean err) . d z / d a', the attribution of patching it.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch

from ..errors import CircuitlabError
from ..features import unvectors, vectors
from ..hooked_model import HookedModel
from .ranking import Ablated


class FeatureAblated(Ablated):
    """An ``Ablated`` whose units at each layer are dictionary features and an error node."""

    rankings = ("iterative", "attribution", "random")

    def __init__(self, hm: HookedModel, layers: Sequence[str], reference: torch.Tensor,
                 ablation: str, basis: dict):
        if ablation not in ("mean", "zero"):
            raise CircuitlabError("feature circuits ablate with 'mean' or 'zero'")
        missing = [n for n in layers if n not in basis]
        if missing:
            raise CircuitlabError(f"no dictionary for {missing}; train one per tapped layer "
                                  f"(circuitlab.features.train_dictionaries)")
        self.hm, self.layers, self.basis = hm, list(layers), basis
        self.raw_axes = {n: hm.point(n).unit_axis for n in self.layers}
        self.axes = {n: 1 for n in self.layers}                  # units of (B, m + 1, P)
        self.sizes = {n: basis[n].m + 1 for n in self.layers}
        with torch.no_grad():
            self.ref_logits, rc = hm.run_with_cache(reference, names=self.layers)
        self.values, self.err_values = {}, {}
        for n in self.layers:
            units, err = self.encode(n, rc[n])
            zero = ablation == "zero"
            self.values[n] = torch.zeros_like(units[:1]) if zero else units.mean(0, keepdim=True)
            self.values[n][:, -1] = 0.0                              # c = 0: error ablated
            self.err_values[n] = torch.zeros_like(err[:1]) if zero else err.mean(0, keepdim=True)

    def encode(self, name: str, act: torch.Tensor) -> tuple:
        """(units (B, m + 1, P) with the error coefficient 1, err (B, P, d))."""
        sae, ax = self.basis[name], self.raw_axes[name]
        rows = vectors(act, ax).to(sae.W_dec.dtype)
        f = sae.encode(rows)
        err = rows - sae.decode(f)
        B = act.shape[0]
        f = f.reshape(B, -1, sae.m)
        units = torch.cat([f, torch.ones_like(f[..., :1])], -1).transpose(1, 2)
        return units, err.reshape(B, -1, sae.d)

    def decode(self, name: str, units: torch.Tensor, err: torch.Tensor,
               like: torch.Tensor) -> torch.Tensor:
        sae = self.basis[name]
        f, c = units[:, :-1].transpose(1, 2), units[:, -1:].transpose(1, 2)   # (B, P, m|1)
        rows = sae.decode(f) + c * err + (1 - c) * self.err_values[name]
        return unvectors(rows.reshape(-1, sae.d), like, self.raw_axes[name]).to(like.dtype)

    def hooks(self, keep: dict, held=None) -> list:
        def make(name):
            def fn(act, _name):
                units, err = self.encode(name, act)
                m = keep[name].to(act.device).view(1, -1, 1)
                units = torch.where(m, units, self.values[name])
                if held is not None:
                    held[name] = units
                return self.decode(name, units, err, act)
            return fn
        return [(n, make(n)) for n in self.layers]

    def ablated_to(self, acts: dict) -> "FeatureAblated":
        """A copy whose ablated features and error are those of ``acts`` ({layer: (1, ...)
        activation of the layer itself}); the error node's coefficient stays 0."""
        a = copy.copy(self)
        a.values, a.err_values = {}, {}
        for n in self.layers:
            units, err = self.encode(n, acts[n])
            units[:, -1] = 0.0
            a.values[n], a.err_values[n] = units, err
        return a

    def zeroed(self) -> "FeatureAblated":
        a = copy.copy(self)
        a.values = {n: torch.zeros_like(v) for n, v in self.values.items()}
        a.err_values = {n: torch.zeros_like(v) for n, v in self.err_values.items()}
        return a
