"""Minimal explanations by activation matching (Suhail, Anand & Sethi 2025; docs/explain.md)."""
from .amortized import Explainer, train_explainer
from .certify import Certificate, certify
from .config import PRESETS, ExplainConfig, amortized_preset, preset
from .generator import MaskGrid, MaskUNet, binarize_ste
from .optimize import Explanation, explain, explain_at_area, minimize
from .regions import RegionSearch, explain_regions

__all__ = ["PRESETS", "Certificate", "ExplainConfig", "Explainer", "Explanation", "MaskGrid",
           "MaskUNet", "RegionSearch", "binarize_ste", "amortized_preset", "certify", "explain",
           "explain_at_area", "explain_regions", "minimize", "preset", "train_explainer"]
