"""One command over a folder of images, into one output folder, unattended.

Per image one sub-folder whose name cannot collide (``cat.png`` -> ``cat_png``, ``cat.jpg``
-> ``cat_jpg``), written whole or not at all (``files.staged``); one results table for the run
(``results.csv`` and ``results.parquet``: image, status, error, every scalar metric, seconds);
the run's settings in ``run.json``. Each image's row is appended to a journal
(``results.jsonl``) as it is recorded, and the table is rewritten from every row (atomically,
the journal then emptied) at most every ``TABLE_EVERY`` seconds (and at most 5 % of the
run's time) and when the run ends or is interrupted: rewritten after every image, a run of n
images wrote n^2 / 2 rows (docs/results.md, "Dataset runs"). Rerunning the same command
skips the images already done (the table's rows and the journal's); a rerun with other
settings is refused; ``force`` redoes them. An image that cannot be read, or whose work
fails, becomes a failed row and the others still run. With ``world`` > 1 (torchrun) each
rank takes every world-th pending image and writes its own journal and table, which
``merge`` joins.

>>> run = FolderRun(out, image_files(folder), "explain", settings, OUTPUTS)
>>> for image in run.shard(run.start()): run.publish(image, lambda tmp: work(image, tmp))
>>> run.flush(); run.merge()
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from . import __version__
from .data import open_image
from .errors import CircuitlabError
from .files import append_line, staged, write_atomic, write_text
from .preprocessing import DataConfig, make_transform

MANIFEST = "run.json"
# while a run goes on, the table is rewritten at most every TABLE_EVERY seconds, and at most
# every TABLE_COST times its last rewrite's duration (a large table's rewrite then costs a
# bounded share of the run, 5 %)
TABLE_EVERY = 10.0
TABLE_COST = 20


def folder_names(images: Sequence[Path]) -> dict:
    """image -> its output sub-folder: the file name with its extension kept (``cat_png``);
    names equal but for case get ``-2``, ``-3`` in sorted order."""
    names, taken = {}, set()
    for image in images:
        image = Path(image)
        base = f"{image.stem}_{image.suffix[1:]}" if image.suffix else image.name
        name, n = base, 1
        while name.casefold() in taken:
            n += 1
            name = f"{base}-{n}"
        taken.add(name.casefold())
        names[image] = name
    return names


def flatten(result: dict) -> dict:
    """The scalar numbers of a result, one level of nesting as ``outer.inner``; lists (region
    tables, search trails) stay in the per-image JSON."""
    def scalar(v):
        return v is None or isinstance(v, (bool, int, float, str))
    row = {}
    for key, value in result.items():
        if isinstance(value, dict):
            row.update({f"{key}.{k}": v for k, v in value.items() if scalar(v)})
        elif scalar(value):
            row[key] = value
    return row


class FolderRun:
    """The bookkeeping of one folder run (see the module docstring)."""

    def __init__(self, out, images: Sequence[Path], command: str, settings: dict,
                 outputs: Sequence[str], required: Optional[Sequence[str]] = None,
                 force: bool = False, rank: int = 0, world: int = 1):
        self.out, self.images = Path(out), [Path(i) for i in images]
        self.names = folder_names(self.images)
        self.command, self.settings, self.force = command, dict(settings), force
        self.outputs, self.required = tuple(outputs), tuple(required or outputs)
        self.rank, self.world = rank, world
        self.rows: dict = {}      # what this rank writes
        self.known: dict = {}     # what every rank sees as done or failed
        self._due = -math.inf     # when the table is next rewritten (time.monotonic)

    @property
    def table(self) -> str:
        return "results" if self.world == 1 else f"results.rank{self.rank}"

    @property
    def journal(self) -> Path:
        """This rank's rows recorded since its table was last written, one JSON line each."""
        return self.out / f"{self.table}.jsonl"

    def folder(self, image: Path) -> Path:
        return self.out / self.names[Path(image)]

    def check(self) -> None:
        """Refuse, before any work, an output folder holding another command's run or the
        same command's with other settings (unless ``force``), or a folder where the run
        writes a file of its own."""
        manifest = self.out / MANIFEST
        if self.out.exists() and not self.out.is_dir():
            raise CircuitlabError(f"{self.out} is a file; --out takes a folder for a folder "
                                  f"of images")
        own = [self.out / n for n in (MANIFEST, f"{self.table}.csv", f"{self.table}.parquet",
                                      self.journal.name)]
        taken = next((path for path in own if path.is_dir()), None)
        if taken is not None:
            raise CircuitlabError(f"{taken} is a folder where the run writes its "
                                  f"{taken.name}; move it or choose another --out")
        if self.force:
            return
        if not manifest.exists():   # outputs not written by a run of ours: never replaced
            clash = next((self.folder(i) / n for i in self.images for n in self.outputs
                          if (self.folder(i) / n).exists()), None)
            if clash is not None:
                raise CircuitlabError(f"{clash} exists and {self.out} holds no circuitlab run "
                                      f"to resume; choose another --out or pass --force")
            return
        try:
            old = json.loads(manifest.read_text())
        except (OSError, ValueError):
            raise CircuitlabError(f"{manifest} is unreadable; choose another --out or pass "
                                  f"--force") from None
        theirs = old.get("settings", {})
        differ = sorted(k for k in set(theirs) | set(self.settings)
                        if theirs.get(k) != self.settings.get(k))
        if old.get("command") != self.command or differ:
            what = ", ".join(f"{k} {theirs.get(k)!r} -> {self.settings.get(k)!r}"
                             for k in differ[:3]) or f"command {old.get('command')}"
            raise CircuitlabError(f"{self.out} holds a run with other settings ({what}); "
                                  f"rerun with the same ones to resume, choose another --out, "
                                  f"or pass --force to redo it")

    def start(self) -> list:
        """The images still to do (``shard`` splits them); writes the run's settings (rank 0). Every
        rank sees the same done set (the run's table and every rank's, as an interrupted
        run left them), so every rank shards the same pending list."""
        self.check()
        known = {} if self.force else self._read_all()
        self.known = known
        # one process keeps every row in results; a rank rewrites its own shard's table
        self.rows = dict(known) if self.world == 1 else {} if self.force else \
            self._read_table(self.table)
        if self.force:     # the journal of a run being redone is no longer what was done
            self.journal.unlink(missing_ok=True)
        if self.rank == 0:
            write_text(self.out / MANIFEST, json.dumps(
                {"command": self.command, "settings": self.settings,
                 "circuitlab": __version__, "torch": torch.__version__}, indent=2) + "\n")
        return [i for i in self.images if self.force or not self.done(i)]

    def shard(self, pending: Sequence[Path]) -> list:
        """This rank's part of the pending images: every world-th, from its rank on."""
        return list(pending)[self.rank::self.world]

    def done(self, image: Path) -> bool:
        row = self.known.get(str(image))
        return bool(row) and row.get("status") == "ok" and all(
            (self.folder(image) / n).exists() for n in self.required)

    def publish(self, image: Path, work: Callable[[Path], dict]) -> Optional[dict]:
        """``work(tmp_folder)`` writes one image's files and returns its result; they replace
        the image's sub-folder as a whole. A failure becomes a failed row (returned None)."""
        try:
            with staged(self.folder(image), self.outputs) as tmp:
                result = work(tmp)
        except CircuitlabError as e:
            self.record(image, error=str(e))
            return None
        except Exception as e:  # unattended: one image's failure must not stop the run
            self.record(image, error=f"{type(e).__name__}: {e}")
            return None
        self.record(image, result)
        return result

    def record(self, image: Path, result: Optional[dict] = None, error: str = "") -> None:
        row = {"image": str(image), "output": self.names[Path(image)],
               "status": "failed" if error else "ok", "error": error, **flatten(result or {})}
        self.rows[str(image)] = row
        append_line(self.journal, json.dumps(row))
        if time.monotonic() >= self._due:
            self.flush()

    def flush(self) -> None:
        """This rank's table rewritten from every row it has, and its journal emptied (each
        of its rows is in the table now)."""
        if not self.rows:
            return
        start = time.monotonic()
        self._write(self.table, self.rows.values())
        self.journal.unlink(missing_ok=True)
        now = time.monotonic()
        self._due = now + max(TABLE_EVERY, TABLE_COST * (now - start))

    def failed(self) -> list:
        return [r for r in self.rows.values() if r["status"] == "failed"
                and Path(r["image"]) in self.names]

    def merge(self) -> pd.DataFrame:
        """Rank 0 (or the one process), after every rank finished: the run's table and the
        ranks' joined into ``results``, the ranks' removed."""
        rows = self._read_all()
        if self.world == 1:
            rows.update(self.rows)
        df = self._write("results", rows.values())
        for table in self._rank_tables():
            for suffix in (".csv", ".parquet", ".jsonl"):
                (self.out / f"{table}{suffix}").unlink(missing_ok=True)
        (self.out / "results.jsonl").unlink(missing_ok=True)
        self.rows = rows
        return df

    def _rank_tables(self) -> list:
        """The ranks' tables that have a table or a journal: ``results.rank0``, ..."""
        return sorted({p.name[:-len(p.suffix)] for p in self.out.glob("results.rank*.*")
                       if p.suffix in (".csv", ".jsonl")})

    def _read_all(self) -> dict:
        rows = self._read_table("results")
        for table in self._rank_tables():
            rows.update(self._read_table(table))
        return rows

    def _read_table(self, table: str) -> dict:
        """``table``'s rows: its CSV, then its journal's (recorded later) over them; a torn
        last line (the writer interrupted), or any line that is no row, is skipped."""
        rows = self._read(self.out / f"{table}.csv")
        journal = self.out / f"{table}.jsonl"
        lines = journal.read_text(encoding="utf-8").splitlines() if journal.is_file() else []
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "image" in row:
                rows[row["image"]] = {k: None if _missing(v) else v for k, v in row.items()}
        return rows

    def _read(self, path: Path) -> dict:
        if not path.is_file():
            return {}
        df = pd.read_csv(path, keep_default_na=False, na_values=[""])
        return {r["image"]: {k: None if _missing(v) else v for k, v in r.items()}
                for r in df.to_dict("records")}

    def _write(self, table: str, rows: Iterable[dict]) -> pd.DataFrame:
        order = {str(i): n for n, i in enumerate(self.images)}
        df = pd.DataFrame(sorted(rows, key=lambda r: (order.get(r["image"], math.inf),
                                                       r["image"])))
        write_text(self.out / f"{table}.csv", df.to_csv(index=False))
        write_atomic(self.out / f"{table}.parquet",
                     lambda f: df.convert_dtypes().to_parquet(f, index=False))
        return df


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


# ---------------------------------------------------------------------------- loading
class ImageFiles(Dataset):
    """Image files preprocessed with a model's data config, read in DataLoader workers; an
    unreadable file yields its error message instead of a tensor."""

    def __init__(self, files: Sequence[Path], config):
        self.files, self.config = list(files), DataConfig.of(config)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            return i, make_transform(self.config)(open_image(self.files[i])), ""
        except CircuitlabError as e:
            return i, None, str(e)


def batches(files: Sequence[Path], config, batch_size: int, workers: int = 0,
            pin_memory: bool = False):
    """Batches of ``[(index, tensor or None, error)]`` in file order."""
    loader = DataLoader(ImageFiles(files, config), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=list, pin_memory=False,
                        persistent_workers=False)
    for batch in loader:
        if pin_memory:
            batch = [(i, t.pin_memory() if t is not None else None, e) for i, t, e in batch]
        yield batch


def default_workers() -> int:
    """Decoding workers: half the cores, at most 4 (the rest compute)."""
    return max(0, min(4, (os.cpu_count() or 2) // 2))
