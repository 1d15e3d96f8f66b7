"""Minimal explanations by activation matching (see ../shared/METHOD.md)."""
from .config import PRESETS, ExplainConfig, preset
from .generator import MaskGrid, MaskUNet, binarize_ste
from .optimize import Explanation, explain

__all__ = ["PRESETS", "ExplainConfig", "Explanation", "MaskGrid", "MaskUNet", "binarize_ste",
           "explain", "preset"]
