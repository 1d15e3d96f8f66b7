"""One checkpoint format for everything circuitlab writes: models, explainers and feature
dictionaries.

A checkpoint is a dict of plain values and tensors, ``{"format": FORMAT, "kind": KIND, ...}``,
written atomically with ``torch.save`` and read back with ``weights_only=True`` (no pickled
code ever runs). A model checkpoint holds ``arch``, ``arch_kwargs``, ``state_dict``,
``data_config`` and ``labels``; an explainer holds its mask network and training state.
Files written before the kinds were joined still read: model checkpoints carried no ``kind``
and explainers their own format tag.

>>> save(path, "model", {"arch": "resnet18", "state_dict": sd, ...})
>>> payload = load(path, "model")
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import torch

from .errors import CircuitlabError
from .files import refuse_overwrite, write_atomic

FORMAT = "circuitlab.checkpoint/1"
KINDS = ("model", "explainer", "features")
# format tags of earlier files -> the kind they hold
_EARLIER = {"circuitlab-explainer-1": "explainer"}

PathLike = Union[str, os.PathLike]


def save(path: PathLike, kind: str, payload: dict, *, overwrite: bool = False,
         hint: str = "pass overwrite=True to replace it") -> Path:
    """Write ``payload`` as a checkpoint of ``kind`` atomically; refuse to replace a file."""
    if kind not in KINDS:
        raise CircuitlabError(f"checkpoint kind must be one of {KINDS}, got {kind!r}")
    path = Path(path)
    refuse_overwrite([path], overwrite, hint)
    obj = {"format": FORMAT, "kind": kind, **payload}
    write_atomic(path, lambda f: torch.save(obj, f))
    return path


def read(path: PathLike, what: str = "checkpoint", missing: str = "") -> dict:
    """The dict in a file, read with ``weights_only=True``: a circuitlab checkpoint or any
    state_dict. ``what`` names the file in errors; ``missing`` is added when it does not
    exist (what to do instead)."""
    path = Path(path)
    if not path.is_file():
        raise CircuitlabError(f"{what} {str(path)!r} does not exist{missing}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CircuitlabError(f"cannot read {what} {str(path)!r} as plain tensors "
                              f"(weights_only=True): {str(e).splitlines()[0][:200]}. Save a "
                              f"state_dict, not a pickled module") from None
    if not isinstance(obj, dict):
        raise CircuitlabError(f"{what} {str(path)!r} holds a {type(obj).__name__}, not a "
                              f"state_dict")
    return obj


def kind_of(obj: dict) -> str:
    """'model', 'explainer', or '' for a dict that is no circuitlab checkpoint."""
    tag = obj.get("format")
    if tag == FORMAT:
        return obj.get("kind", "model")
    return _EARLIER.get(tag, "") if isinstance(tag, str) else ""


def load(path: PathLike, kind: str, missing: str = "", written_by: str = "") -> dict:
    """A circuitlab checkpoint of ``kind``; one clear error for anything else."""
    obj = read(path, f"{kind} checkpoint", missing)
    if kind_of(obj) != kind:
        raise CircuitlabError(f"{str(path)!r} is not a circuitlab {kind} checkpoint"
                              f"{written_by}")
    return obj
