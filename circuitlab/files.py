"""Writing outputs: atomically, and never over what the user already has unless asked.

A leaf: it imports nothing of circuitlab but ``errors``. Every writer of the library, the CLI,
the analyses and the benchmarks goes through these functions.

>>> refuse_overwrite([out / "mask.png", out / "metrics.json"], force=False)
>>> write_text(out / "metrics.json", json.dumps(result))
>>> write_atomic(out / "mask.png", lambda f: image.save(f, format="PNG"))
>>> append_line(out / "results.jsonl", json.dumps(row))   # a journal, one line per record
>>> with locked(out), staged(out, OUTPUTS) as tmp:   # one writer; the result swapped in whole
...     write_text(tmp / "metrics.json", json.dumps(result))
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
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


@contextlib.contextmanager
def _writing_in(folder: PathLike):
    """Inside the block, a refusal of the file system (read-only or virtual, a name it
    rejects) to make something in ``folder`` becomes one CircuitlabError naming why."""
    try:
        yield
    except OSError as e:
        raise CircuitlabError(f"cannot write in the folder {folder} ({e.strerror or e}); "
                              f"pass --out a folder you can write to") from None


def make_folder(folder: PathLike) -> None:
    """Create ``folder`` and its parents, or one CircuitlabError naming why not."""
    with _writing_in(folder):
        Path(folder).mkdir(parents=True, exist_ok=True)


def write_atomic(path: PathLike, write: Callable) -> None:
    """Call ``write(fileobj)`` on a temporary file beside ``path``, then rename it into place:
    a reader (or an interrupted run) never sees half a file."""
    path = Path(path)
    make_folder(path.parent)
    with _writing_in(path.parent):
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


def append_line(path: PathLike, line: str) -> None:
    """``line`` appended to ``path`` (a journal) in one write: an interrupted writer leaves
    whole lines and at most a torn last one, which its reader skips."""
    path = Path(path)
    make_folder(path.parent)
    with _writing_in(path.parent), open(path, "a", encoding="utf-8") as f:
        f.write(line.rstrip("\n") + "\n")


def cache_root() -> Path:
    """Where the library keeps what it makes once and reuses (trained benchmark models,
    compiled forwards): ``$CIRCUITLAB_CACHE``, else ``$XDG_CACHE_HOME/circuitlab``, else
    ``~/.cache/circuitlab``."""
    root = os.environ.get("CIRCUITLAB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "circuitlab")
    return Path(root)


# ---------------------------------------------------------------------------- whole results
@contextlib.contextmanager
def locked(target: PathLike):
    """Hold ``target`` (an output file or folder) for one run: a second run that would write
    it refuses with one line while this one lives; a lock left by a run that died is taken
    over. The lock is a file beside the target: ``.<name>.circuitlab-lock``."""
    target = Path(target)
    lock = target.parent / f".{target.name}.circuitlab-lock"
    make_folder(lock.parent)
    me = f"{socket.gethostname()} {os.getpid()}"
    while True:
        with _writing_in(lock.parent):          # any refusal but a clash: one line
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                fd = None
        if fd is not None:
            break
        owner = lock.read_text(errors="replace").split() if lock.exists() else []
        if len(owner) == 2 and _alive(*owner):
            raise CircuitlabError(f"{target} is being written by another circuitlab run "
                                  f"(process {owner[1]} on {owner[0]}); wait for it or "
                                  f"choose another --out")
        lock.unlink(missing_ok=True)   # its run died: take over
    with os.fdopen(fd, "w") as f:
        f.write(me)
    try:
        yield target
    finally:
        lock.unlink(missing_ok=True)


def _alive(host: str, pid: str) -> bool:
    if host != socket.gethostname():
        return True                         # another machine's run: assume it lives
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def staged(target: PathLike, outputs: Iterable[str]):
    """A temporary folder to write one result into; on success its files replace the result
    in ``target`` as a whole (old ``outputs`` the new result lacks are removed, other files
    are left alone); on failure ``target`` is untouched. A rerun with --force therefore never
    leaves a folder mixing new files with old ones."""
    target = Path(target)
    make_folder(target.parent)
    with _writing_in(target.parent):
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
    try:
        yield tmp
        make_folder(target)
        made = {p.name for p in tmp.iterdir()}
        for name in outputs:
            if name not in made:
                (target / name).unlink(missing_ok=True)
        for name in sorted(made):
            os.replace(tmp / name, target / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
