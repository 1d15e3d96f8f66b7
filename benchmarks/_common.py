"""What every benchmark script does with its table: print it, write it as CSV atomically."""
from __future__ import annotations

from typing import Optional, Sequence

import pandas as pd

from circuitlab.files import write_text


def report(df: pd.DataFrame, out, columns: Optional[Sequence[str]] = None,
           float_format: str = "{:.3f}", note: str = "") -> None:
    """Print ``df`` (its ``columns``, default all) and write all of it to ``out``."""
    with pd.option_context("display.width", 200, "display.max_rows", 500,
                           "display.float_format", float_format.format):
        print((df[list(columns)] if columns else df).to_string(index=False))
    write_text(out, df.to_csv(index=False))
    print(f"wrote {out}{note}")
