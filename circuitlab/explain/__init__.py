"""Minimal explanations by activation matching (see ../shared/METHOD.md)."""
from .config import PRESETS, ExplainConfig, preset
from .generator import MaskUNet, binarize_ste
from .optimize import Explanation, explain

__all__ = ["PRESETS", "ExplainConfig", "Explanation", "MaskUNet", "binarize_ste", "explain",
           "preset"]
