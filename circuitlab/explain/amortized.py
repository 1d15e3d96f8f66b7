"""Amortized explanations: one mask U-Net trained over a dataset, then one forward per image.

>>> explainer = train_explainer(hm, images, steps=600, checkpoint="explainer.pt")
>>> ex = explainer.explain(hm, x)             # one generator forward
>>> ex = explainer.explain(hm, x, refine=10)  # plus 10 per-image steps from that mask
>>> explainer = Explainer.load("explainer.pt")

Training distils the per-image method: every training image is explained once with the
per-image objective (the teacher, batched), then the U-Net learns to reproduce those masks
(binary cross-entropy + soft Dice, random left-right flips). Training the U-Net on the
objective directly, as the paper does for one image, collapsed to empty or full masks on the
synthetic benchmark in every setting tried (the logits of a fresh network cross 0.5 together);
the distilled network finds the planted object as well as the per-image masks but keeps the
label less often on its own (docs/results.md: CNN 0.95, ViT 0.78 of images), which ``refine``
restores.
Batches depend only on (seed, step), so a resumed run sees the same batches as an
uninterrupted one.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Callable, Optional, Union

import pandas as pd
import torch
import torch.nn.functional as F

from .. import checkpoints
from ..distributed import active, gather_objects, mean
from ..errors import CircuitlabError
from ..hooked_model import HookedModel
from .config import ExplainConfig, amortized_preset, preset
from .generator import MaskGrid, MaskUNet
from .optimize import Explanation, explain


class Explainer:
    """A trained amortized mask generator for one classifier (name and input size recorded)."""

    def __init__(self, net: MaskUNet, config: ExplainConfig, model_name: str,
                 input_size: tuple, step: int = 0, history: Optional[list] = None):
        self.net, self.config = net.eval(), config
        self.model_name, self.input_size = model_name, tuple(input_size)
        self.step, self.history = step, list(history or [])

    @classmethod
    def untrained(cls, config: ExplainConfig, model_name: str,
                  input_size: tuple) -> "Explainer":
        """An explainer whose U-Net is freshly initialised: what ``train_explainer`` starts
        from, and enough to time the generator."""
        return cls(_build_net(input_size[0], config), config, model_name, input_size)

    def _check(self, hm: HookedModel, x: torch.Tensor) -> torch.Tensor:
        if hm.name != self.model_name:
            raise CircuitlabError(f"this explainer was trained for {self.model_name!r}, not "
                                  f"{hm.name!r}; train one with `circuitlab train-explainer "
                                  f"--model {hm.name}`")
        x = hm.check_input(x)
        if tuple(x.shape[1:]) != self.input_size:
            raise CircuitlabError(f"the explainer expects inputs of shape {self.input_size}, "
                                  f"got {tuple(x.shape[1:])}")
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Mask logits at the generator's resolution (B, 1, h, w)."""
        net = self.net.to(x.device)
        xg = F.avg_pool2d(x, self.config.input_scale) if self.config.input_scale > 1 else x
        return net(xg)

    def explain(self, hm: HookedModel, x: torch.Tensor, refine: int = 0,
                seed: int = 0) -> Explanation:
        """Masks for ``x`` in one generator forward; ``refine`` > 0 continues per image from
        those logits with the default preset's optimiser (the amortized mask is step 1, so
        refinement never returns a worse label-keeping mask)."""
        x = self._check(hm, x)
        t0 = time.perf_counter()
        with torch.no_grad():
            logits = self.logits(x)
        if refine > 0:
            cfg = preset("default", hm.family.name, min(x.shape[-2:])).replace(
                steps=int(refine), min_steps=int(refine), taps=self.config.taps,
                alphas=self.config.alphas, distances=self.config.distances)
            ex = explain(hm, x, cfg, seed=seed, mask_net=MaskGrid.from_logits(logits))
            ex.seconds = time.perf_counter() - t0
            return ex
        with torch.no_grad():
            p = torch.sigmoid(logits)
            mask = F.interpolate((p > 0.5).to(x.dtype), size=x.shape[-2:], mode="nearest")
            target = hm(x).argmax(-1)
        return Explanation(mask=mask, soft=p.cpu(), explanation=mask * x, target=target,
                           history=pd.DataFrame(), steps=0,
                           seconds=time.perf_counter() - t0, config=self.config)

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: Union[str, os.PathLike], overwrite: bool = False,
             training: Optional[dict] = None) -> Path:
        """Write the explainer atomically; ``training`` holds the state to resume from."""
        payload = {"model": self.model_name, "input_size": list(self.input_size),
                   "config": asdict(self.config), "step": self.step, "history": self.history,
                   "state_dict": self.net.state_dict(), "training": training}
        return checkpoints.save(path, "explainer", payload, overwrite=overwrite,
                                hint="pass overwrite=True (--force) to replace it or "
                                     "resume=True (--resume) to continue it")

    @classmethod
    def load(cls, path: Union[str, os.PathLike], with_training: bool = False):
        """Read a checkpoint with ``weights_only=True``; (explainer, training state) if
        ``with_training``."""
        obj = checkpoints.load(path, "explainer",
                               missing="; train one with `circuitlab train-explainer`",
                               written_by=" (written by `circuitlab train-explainer`)")
        known = {f.name for f in fields(ExplainConfig)}
        cfg = ExplainConfig(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in obj["config"].items() if k in known})
        net = _build_net(obj["input_size"][0], cfg)
        net.load_state_dict(obj["state_dict"])
        ex = cls(net, cfg, obj["model"], tuple(obj["input_size"]), obj["step"],
                 obj.get("history"))
        return (ex, obj.get("training")) if with_training else ex


def _build_net(in_chans: int, cfg: ExplainConfig) -> MaskUNet:
    if cfg.generator != "unet":
        raise CircuitlabError("amortized mode trains a U-Net generator (generator='unet')")
    return MaskUNet(in_chans, cfg.width, cfg.depth, cfg.out_stride, cfg.init_keep)


def _batch(n: int, batch_size: int, seed: int, step: int):
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(n, (batch_size,), generator=g), torch.rand(batch_size, generator=g) < .5


def _distill_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice: BCE alone leaves small objects below the 0.5 threshold (measured)."""
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + dice.mean()


def teacher_masks(hm: HookedModel, images: torch.Tensor, size: tuple, *, steps=None,
                  batch_size: int = 64, seed: int = 0, done: Optional[torch.Tensor] = None,
                  on_chunk: Optional[Callable[[torch.Tensor], None]] = None,
                  progress: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """Per-image masks (N, 1, *size) of the default preset, computed in batches; ``done``
    holds the first masks of an interrupted run."""
    out = [done] if done is not None and len(done) else []
    start = len(done) if done is not None else 0
    rank, world = active()
    if world > 1:   # each process a share of the chunks (same seeds), then all of them
        mine = {i: _teacher_chunk(hm, images, i, batch_size, size, steps, seed)
                for i in range(start, len(images), batch_size)[rank::world]}
        found = {i: m for part in gather_objects(mine) for i, m in part.items()}
        return torch.cat(out + [found[i] for i in sorted(found)])
    for i in range(start, len(images), batch_size):
        out.append(_teacher_chunk(hm, images, i, batch_size, size, steps, seed))
        if on_chunk:
            on_chunk(torch.cat(out))
        if progress:
            progress(min(i + batch_size, len(images)), len(images))
    return torch.cat(out)


def _teacher_chunk(hm, images, i, batch_size, size, steps, seed) -> torch.Tensor:
    ex = explain(hm, images[i:i + batch_size], steps=steps, seed=seed + i)
    return (F.interpolate(ex.mask.cpu(), size=size, mode="area") > 0.5).to(torch.uint8)


def train_explainer(hm: HookedModel, images: torch.Tensor,
                    config: Optional[ExplainConfig] = None, *, steps: Optional[int] = None,
                    batch_size: int = 32, teacher_steps: Optional[int] = None, seed: int = 0,
                    checkpoint: Optional[Union[str, os.PathLike]] = None,
                    resume: bool = False, overwrite: bool = False, save_every: int = 100,
                    progress: Optional[Callable[[str, int, int, dict], None]] = None
                    ) -> Explainer:
    """Train a mask U-Net over ``images`` (N, C, H, W, normalised model inputs).

    ``checkpoint`` is written atomically after each teacher batch, every ``save_every``
    steps and at the end; ``resume=True`` continues from it. ``progress(phase, i, n, row)``
    is called per teacher batch (phase "teacher") and per training step ("train").
    """
    images = hm.check_input(images)
    cfg = config or amortized_preset(hm.family.name, min(images.shape[-2:]))
    if steps is not None:
        cfg = cfg.replace(steps=int(steps))
    if batch_size < 1 or cfg.steps < 1:
        raise CircuitlabError("steps and batch_size must be at least 1")
    torch.manual_seed(seed)
    explainer = Explainer.untrained(cfg, hm.name, tuple(images.shape[1:]))
    net = explainer.net.to(images.device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    with torch.no_grad():  # the teacher masks live on the explainer's output grid
        size = tuple(explainer.logits(images[:1]).shape[-2:])
    state = {"n_images": len(images), "seed": seed, "teacher_steps": teacher_steps,
             "teacher": None, "optimizer": None}
    if checkpoint is not None and Path(checkpoint).exists():
        if not resume and not overwrite:
            raise CircuitlabError(f"{str(checkpoint)!r} exists; pass --resume to continue it "
                                  f"or --force to start over")
        if resume:
            explainer, state = _resumed(checkpoint, explainer, opt, len(images))

    def save():
        if checkpoint is not None and active()[0] == 0:   # one writer
            state["optimizer"] = opt.state_dict()
            explainer.save(checkpoint, overwrite=True, training=state)

    def on_chunk(masks):
        state["teacher"] = masks
        save()

    teacher = state["teacher"]
    if teacher is None or len(teacher) < len(images):
        teacher = teacher_masks(
            hm, images, size, steps=teacher_steps, seed=seed, done=teacher,
            on_chunk=on_chunk, progress=(lambda i, n: progress("teacher", i, n, {}))
            if progress else None)
        state["teacher"] = teacher
    _distil(explainer, opt, images, teacher.float(), batch_size, seed, save, save_every,
            progress)
    return explainer


def _resumed(checkpoint, explainer: Explainer, opt, n_images: int) -> tuple:
    """(the explainer, its training state) continued from ``checkpoint``, into ``explainer``'s
    network and ``opt``, after checking it was trained for the same model and images."""
    saved, state = Explainer.load(checkpoint, with_training=True)
    if saved.model_name != explainer.model_name or saved.input_size != explainer.input_size:
        raise CircuitlabError(f"{str(checkpoint)!r} was trained for {saved.model_name} at "
                              f"{saved.input_size}; cannot resume it for "
                              f"{explainer.model_name} at {explainer.input_size}")
    if not state or state.get("n_images") != n_images:
        raise CircuitlabError(f"{str(checkpoint)!r} was trained on a different image set (or "
                              f"finished without training state); pass --force to start over")
    explainer.net.load_state_dict(saved.net.state_dict())
    resumed = Explainer(explainer.net, saved.config.replace(steps=explainer.config.steps),
                        explainer.model_name, saved.input_size, saved.step, saved.history)
    if state.get("optimizer"):
        opt.load_state_dict(state["optimizer"])
    return resumed, state


def _distil(explainer: Explainer, opt, images, target_all, batch_size: int, seed: int, save,
            save_every: int, progress) -> None:
    """The U-Net's training steps, from where ``explainer`` stands to its config's steps.
    Under torchrun: DistributedDataParallel, each process a 1/world share of every global
    batch, so averaging the shares' gradients is the gradient of the global batch's loss."""
    cfg, net = explainer.config, explainer.net
    rank, world = active()
    if world > 1 and batch_size % world:
        raise CircuitlabError(f"batch_size {batch_size} does not split over {world} "
                              f"processes; use a multiple of {world}")
    forward = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    net.train()
    for step in range(explainer.step + 1, cfg.steps + 1):
        idx, flip = _batch(len(images), batch_size, seed, step)
        idx, flip = idx[rank::world], flip[rank::world]
        xb, yb = images[idx], target_all[idx].to(images.device)
        f = flip.to(images.device)[:, None, None, None]
        xb, yb = torch.where(f, xb.flip(-1), xb), torch.where(f, yb.flip(-1), yb)
        xg = F.avg_pool2d(xb, cfg.input_scale) if cfg.input_scale > 1 else xb
        loss = _distill_loss(forward(xg), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        row = {"step": step, "loss": mean(loss)}
        explainer.history.append(row)
        explainer.step = step
        if progress:
            progress("train", step, cfg.steps, row)
        if step % save_every == 0 or step == cfg.steps:
            save()
    net.eval()
