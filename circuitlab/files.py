"""Writing outputs: atomically, and never over what the user already has unless asked.

A leaf: it imports nothing of circuitlab but ``errors``. Every writer of the library, the CLI,
the analyses and the benchmarks goes through these functions.

>>> refuse_overwrite([out / "mask.png", out / "metrics.json"], force=False)
>>> write_text(out / "metrics.json", json.dumps(result))
>>> write_atomic(out / "mask.png", lambda f: image.save(f, format="PNG"))
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Union

from .errors import CircuitlabError

PathLike = Union[str, os.PathLike]


def refuse_overwrite(paths: Iterable[PathLike], force: bool,
                     hint: str = "choose another --out or pass --force") -> None:
    """Raise one CircuitlabError naming the first of ``paths`` that exists, unless ``force``;
    or, ``force`` or not, one that can never be written: its folder is a file, it is itself a
    folder, or its nearest existing folder is not writable (checked before any work)."""
    paths = [Path(p) for p in paths]
    for path in paths:
        blocked = next((d for d in path.parents if d.exists() and not d.is_dir()), None)
        if blocked is not None:
            raise CircuitlabError(f"{blocked} is a file, so {path} cannot be written; pass "
                                  f"--out a folder (or a path under one)")
        if path.is_dir():
            raise CircuitlabError(f"{path} is a folder where a file is to be written; pass "
                                  f"--out another path")
        anchor = next((d for d in path.parents if d.exists()), None)
        if anchor is not None and not os.access(anchor, os.W_OK | os.X_OK):
            raise CircuitlabError(f"{anchor} is not writable, so {path} cannot be written; "
                                  f"pass --out a folder you can write to")
    clash = [p for p in paths if p.exists()]
    if clash and not force:
        many = f"{len(clash)} output file(s) would be replaced" if len(paths) > 1 else \
            "not replaced"
        raise CircuitlabError(f"{clash[0]} exists ({many}); {hint}")


def write_atomic(path: PathLike, write: Callable) -> None:
    """Call ``write(fileobj)`` on a temporary file beside ``path``, then rename it into place:
    a reader (or an interrupted run) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        # mkstemp makes the file private (0600); give it the mode a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: PathLike, text: str) -> None:
    """``text`` (UTF-8) to ``path`` atomically: CSV tables, JSON reports, Markdown, HTML."""
    write_atomic(path, lambda f: f.write(text.encode()))
