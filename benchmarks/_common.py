"""What every benchmark script does: refuse at its start what would fail at its end, print
its table and write it as CSV atomically; a refusal is one line and exit status 2."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import pandas as pd
import torch

from circuitlab import CircuitlabError
from circuitlab.files import make_folder, write_text


def run_benchmark(main: Callable[[], int]) -> None:
    """Exit with ``main()``'s status; a CircuitlabError (an output folder it cannot write, a
    device this machine lacks) is one line on stderr and status 2, not a traceback."""
    try:
        code = main()
    except CircuitlabError as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)


def start(out, device: str = "cpu") -> None:
    """Refuse at once, before minutes of timing: an ``--out`` whose folder cannot be made or
    written, a ``--device`` torch does not know or this machine lacks."""
    make_folder(Path(out).parent)
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise CircuitlabError(f"unknown device {device!r}; pass --device cpu or cuda") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise CircuitlabError("no CUDA device on this machine; pass --device cpu")


def report(df: pd.DataFrame, out, columns: Optional[Sequence[str]] = None,
           float_format: str = "{:.3f}", note: str = "") -> None:
    """Print ``df`` (its ``columns``, default all) and write all of it to ``out``."""
    with pd.option_context("display.width", 200, "display.max_rows", 500,
                           "display.float_format", float_format.format):
        print((df[list(columns)] if columns else df).to_string(index=False))
    write_text(out, df.to_csv(index=False))
    print(f"wrote {out}{note}")
