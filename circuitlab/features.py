"""Sparse dictionaries on tapped layers: a basis in which circuits can be sparse.

A layer's activation at one position is a vector a over its units (channels, or a token's
residual stream). A top-k sparse autoencoder (Gao et al. 2024) writes it as

    f = TopK(ReLU(W_enc (a - b_dec) + b_enc)),     a = W_dec f + b_dec + err

with m >> d dictionary features, at most k of them active, unit-norm decoder columns, and
the reconstruction error ``err`` kept as its own node (as in sparse feature circuits, Marks
et al. 2024), so a circuit over features plus error nodes runs the network exactly.

>>> dicts = train_dictionaries(hm, hm.taps, images, size=4, k=8)
>>> save_dictionaries("dicts.pt", hm, dicts); dicts = load_dictionaries("dicts.pt", hm)

Circuits over these features: ``circuits.prepare(..., basis=dicts)``.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Union

import torch
from torch import nn

from . import checkpoints
from .errors import CircuitlabError
from .hooked_model import HookedModel


class SparseDictionary(nn.Module):
    """A top-k sparse autoencoder over vectors of ``d`` units with ``m`` features."""

    def __init__(self, d: int, m: int, k: int):
        super().__init__()
        if not 1 <= k <= m:
            raise CircuitlabError(f"k must lie in 1..m ({m}), got {k}")
        self.d, self.m, self.k = d, m, k
        self.W_enc = nn.Parameter(torch.empty(m, d))
        self.b_enc = nn.Parameter(torch.zeros(m))
        self.W_dec = nn.Parameter(torch.empty(d, m))
        self.b_dec = nn.Parameter(torch.zeros(d))
        nn.init.kaiming_uniform_(self.W_dec, a=math.sqrt(5))
        with torch.no_grad():
            self.W_dec /= self.W_dec.norm(dim=0, keepdim=True)
            self.W_enc.copy_(self.W_dec.t())       # tied start, as Gao et al.

    def encode(self, a: torch.Tensor) -> torch.Tensor:
        """(N, d) -> (N, m) with at most k non-zeros per row."""
        pre = torch.relu((a - self.b_dec) @ self.W_enc.t() + self.b_enc)
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec.t() + self.b_dec

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(a))

    @torch.no_grad()
    def normalise(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=0, keepdim=True).clamp_min(1e-8)


def vectors(act: torch.Tensor, axis: int) -> torch.Tensor:
    """(B, ..., U at ``axis``, ...) -> (B * positions, U): one row per position."""
    return act.movedim(axis, -1).reshape(-1, act.shape[axis])


def unvectors(rows: torch.Tensor, like: torch.Tensor, axis: int) -> torch.Tensor:
    """The inverse of ``vectors`` for an activation shaped like ``like``."""
    shape = list(like.movedim(axis, -1).shape[:-1]) + [rows.shape[-1]]
    return rows.reshape(shape).movedim(-1, axis)


@torch.no_grad()
def _collect(hm: HookedModel, layer: str, images: torch.Tensor, batch: int) -> torch.Tensor:
    ax = hm.point(layer).unit_axis
    if ax is None:
        raise CircuitlabError(f"layer {layer!r} has no unit axis to build a dictionary on")
    rows = [vectors(hm.run_with_cache(images[i:i + batch], names=[layer])[1][layer], ax)
            for i in range(0, len(images), batch)]
    return torch.cat(rows)


def train_dictionary(acts: torch.Tensor, m: int, k: int, steps: int = 2000,
                     batch: int = 1024, lr: float = 1e-3, seed: int = 0) -> SparseDictionary:
    """A dictionary fitted to ``acts`` (N, d) by Adam on the mean squared error, decoder
    columns renormalised after every step (the loss cannot shrink them to cheat)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    acts = acts.float()
    sae = SparseDictionary(acts.shape[1], m, k).to(acts.device)
    with torch.no_grad():
        sae.b_dec.copy_(acts.mean(0))
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    scale = acts.var(0).sum().clamp_min(1e-12)
    for _ in range(steps):
        idx = torch.randint(len(acts), (min(batch, len(acts)),), generator=g)
        a = acts[idx.to(acts.device)]
        loss = ((sae(a) - a) ** 2).sum(-1).mean() / scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sae.normalise()
    return sae.eval().requires_grad_(False)


def explained_variance(sae: SparseDictionary, acts: torch.Tensor) -> float:
    """1 - ||a - a_hat||^2 / ||a - mean a||^2 over ``acts`` (N, d)."""
    with torch.no_grad():
        err = ((sae(acts) - acts) ** 2).sum()
        return float(1 - err / ((acts - acts.mean(0)) ** 2).sum().clamp_min(1e-12))


def train_dictionaries(hm: HookedModel, layers: Sequence[str], images: torch.Tensor, *,
                       size: int = 4, k: int = 8, steps: int = 2000, batch: int = 32,
                       max_rows: int = 200_000, seed: int = 0, log=None) -> dict:
    """{layer: SparseDictionary} with ``size`` x the layer's units features each, fitted to
    the activations of ``images`` (N, C, H, W) at every position (at most ``max_rows``
    positions drawn at random per layer)."""
    out = {}
    g = torch.Generator().manual_seed(seed)
    for layer in layers:
        acts = _collect(hm, layer, hm.check_input(images), batch)
        if len(acts) > max_rows:
            acts = acts[torch.randperm(len(acts), generator=g)[:max_rows]]
        sae = train_dictionary(acts, size * acts.shape[1], min(k, size * acts.shape[1]), steps,
                               seed=seed)
        out[layer] = sae
        if log:
            log(f"{layer}: {sae.m} features, k={sae.k}, explained variance "
                f"{explained_variance(sae, acts):.3f} on {len(acts)} positions")
    return out


def save_dictionaries(path: Union[str, os.PathLike], hm: HookedModel, dicts: dict, *,
                      overwrite: bool = False) -> None:
    checkpoints.save(path, "features", {
        "model": hm.name, "layers": {n: {"d": s.d, "m": s.m, "k": s.k,
                                         "state_dict": s.state_dict()}
                                     for n, s in dicts.items()}}, overwrite=overwrite)


def load_dictionaries(path: Union[str, os.PathLike], hm: Optional[HookedModel] = None) -> dict:
    """{layer: SparseDictionary} from a features checkpoint (read with weights_only=True)."""
    obj = checkpoints.load(path, "features")
    if hm is not None and obj.get("model") != hm.name:
        raise CircuitlabError(f"{str(path)!r} holds dictionaries of {obj.get('model')!r}, "
                              f"not {hm.name!r}")
    out = {}
    for layer, spec in obj["layers"].items():
        if hm is not None and hm.n_units(layer) != spec["d"]:
            raise CircuitlabError(f"the dictionary of {layer!r} reads {spec['d']} units; "
                                  f"{hm.name} has {hm.n_units(layer)} there")
        s = SparseDictionary(spec["d"], spec["m"], spec["k"])
        s.load_state_dict(spec["state_dict"])
        out[layer] = s.eval().requires_grad_(False)
    return out
