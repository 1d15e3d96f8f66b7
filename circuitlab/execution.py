"""How a hot loop runs the model, declared once (torch-free, so the CLI can offer the choices
without loading torch): precision, compile mode, memory layout. ``readers.TapReader`` runs it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .errors import CircuitlabError

PRECISIONS = ("fp32", "bf16")                 # bf16: torch.autocast to bfloat16
TORCH_COMPILE_MODES = ("default", "reduce-overhead")   # torch.compile modes
# None: eager; "aot": an AOTInductor package cached on disk (``aot``), logits only, no
# gradients, fp32 on a CPU: the region search's scoring
COMPILE_MODES = (None, *TORCH_COMPILE_MODES, "aot")


@dataclass(frozen=True)
class Execution:
    """``precision``: ``fp32``, or ``bf16`` autocast (activations read in bf16, logits
    returned in fp32); ``compile``: None, a ``torch.compile`` mode (``reduce-overhead``
    replays CUDA graphs on a GPU) or ``aot`` (the module ``aot``'s ahead-of-time compiled
    package: the logits alone, without gradients, fp32 on a CPU); ``channels_last``: the
    model's weights and the inputs in channels-last layout (the weights stay converted);
    ``fold_batchnorm``: the reader runs a copy of the model with each eval-mode BatchNorm
    folded into the convolution that feeds it (``folding``; the same logits up to float
    rounding, the weights as they were when the reader was made)."""

    precision: str = "fp32"
    compile: Optional[str] = None
    channels_last: bool = False
    fold_batchnorm: bool = False

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise CircuitlabError(f"unknown precision {self.precision!r}; use one of "
                                  f"{list(PRECISIONS)}")
        if self.compile not in COMPILE_MODES:
            raise CircuitlabError(f"unknown compile mode {self.compile!r}; use one of "
                                  f"{[m for m in COMPILE_MODES if m]} or None")
        if self.compile == "aot" and self.precision != "fp32":
            raise CircuitlabError("compile 'aot' runs fp32; use precision 'fp32' with it")
