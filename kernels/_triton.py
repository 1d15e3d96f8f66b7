"""Triton, when it is installed: ``triton`` and ``tl`` are None elsewhere (macOS, Windows, ARM).

On a machine with no GPU the kernels still run under Triton's interpreter, which reads
``TRITON_INTERPRET=1`` when a kernel is defined: set it before ``circuitlab.kernels`` is first
imported.
"""
try:  # pragma: no cover - depends on the platform
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = tl = None

import os

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
