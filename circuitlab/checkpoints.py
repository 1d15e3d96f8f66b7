"""One checkpoint format for everything circuitlab writes: models, explainers and feature
dictionaries.

A checkpoint is a dict of plain values and tensors, ``{"format": FORMAT, "kind": KIND, ...}``,
written atomically with ``torch.save`` and read back with ``weights_only=True`` (no pickled
code ever runs); a model may also be written as ``.safetensors`` (its tensors, and the rest as
JSON metadata). A model checkpoint holds ``arch``, ``arch_kwargs``, ``state_dict``,
``data_config`` and ``labels``; an explainer holds its mask network and training state.
Files written before the kinds were joined still read: model checkpoints carried no ``kind``
and explainers their own format tag.

>>> save(path, "model", {"arch": "resnet18", "state_dict": sd, ...})
>>> payload = load(path, "model")
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

import torch

from .errors import CircuitlabError
from .files import refuse_overwrite, write_atomic

FORMAT = "circuitlab.checkpoint/1"
SAFETENSORS = ".safetensors"
KINDS = ("model", "explainer", "features")
# format tags of earlier files -> the kind they hold
_EARLIER = {"circuitlab-explainer-1": "explainer"}

PathLike = Union[str, os.PathLike]


def save(path: PathLike, kind: str, payload: dict, *, overwrite: bool = False,
         hint: str = "pass overwrite=True to replace it") -> Path:
    """Write ``payload`` as a checkpoint of ``kind`` atomically; refuse to replace a file.
    A ``.safetensors`` path holds a model: its ``state_dict`` as safetensors, the rest as
    JSON in the file's metadata."""
    if kind not in KINDS:
        raise CircuitlabError(f"checkpoint kind must be one of {KINDS}, got {kind!r}")
    path = Path(path)
    refuse_overwrite([path], overwrite, hint)
    if path.suffix == SAFETENSORS:
        write_atomic(path, lambda f: f.write(_safetensors_bytes(kind, payload)))
        return path
    obj = {"format": FORMAT, "kind": kind, **payload}
    write_atomic(path, lambda f: torch.save(obj, f))
    return path


def _safetensors_bytes(kind: str, payload: dict) -> bytes:
    from safetensors.torch import save as to_bytes
    if kind != "model" or not isinstance(payload.get("state_dict"), dict):
        raise CircuitlabError(f"a {kind} checkpoint holds training state that is not plain "
                              f"tensors; write it as .pt (read back with weights_only=True)")
    rest = {k: v for k, v in payload.items() if k != "state_dict"}
    # tied weights share storage, which safetensors refuses: each tensor gets its own copy
    tensors = {k: v.detach().clone().contiguous() for k, v in payload["state_dict"].items()}
    return to_bytes(tensors, metadata={"format": FORMAT, "kind": kind,
                                       "payload": json.dumps(rest)})


def _read_safetensors(path: Path, what: str) -> dict:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        rest = json.loads(meta.get("payload", "{}"))
    except Exception as e:
        raise CircuitlabError(f"cannot read {what} {str(path)!r} as safetensors: "
                              f"{str(e).splitlines()[0][:200]}") from None
    tags = {k: meta[k] for k in ("format", "kind") if k in meta}
    return {**tags, **rest, "state_dict": state} if tags else state


def read(path: PathLike, what: str = "checkpoint", missing: str = "") -> dict:
    """The dict in a file, read with ``weights_only=True``: a circuitlab checkpoint or any
    state_dict. ``what`` names the file in errors; ``missing`` is added when it does not
    exist (what to do instead)."""
    path = Path(path)
    if not path.is_file():
        raise CircuitlabError(f"{what} {str(path)!r} does not exist{missing}")
    if path.suffix == SAFETENSORS:
        return _read_safetensors(path, what)
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
