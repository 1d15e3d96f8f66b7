"""User-facing errors: one clear sentence that says what to do, never a deep stack trace."""
from __future__ import annotations

import difflib
from typing import Iterable


class CircuitlabError(Exception):
    """Bad input or an unsupported request. The CLI prints the message on one line and exits 2."""


def did_you_mean(name: str, choices: Iterable[str], n: int = 3) -> str:
    """' Did you mean a, b?' for the closest choices, or '' when none is close."""
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.6)
    if not close:
        # Substring hits catch 'layer3' -> 'layer3.0.conv1' style near misses.
        close = [c for c in choices if name in c][:n]
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
