"""Minimal explanations by activation matching (see ../shared/METHOD.md)."""
from .amortized import Explainer, train_explainer
from .certify import Certificate, certify
from .config import PRESETS, ExplainConfig, amortized_preset, preset
from .generator import MaskGrid, MaskUNet, binarize_ste
from .optimize import Explanation, explain, explain_at_area

__all__ = ["PRESETS", "Certificate", "ExplainConfig", "Explainer", "Explanation", "MaskGrid",
           "MaskUNet", "binarize_ste", "amortized_preset", "certify", "explain",
           "explain_at_area", "preset", "train_explainer"]
