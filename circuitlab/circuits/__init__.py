"""Circuits: channel / head-level graphs read from a (minimal) explanation, validated by
ablation and patching."""
from .circuit import Circuit
from .config import ReadoutConfig
from .patching import ablate_units, agreement, patch_units
from .readout import read_circuit, select
from .search import SizeSearch, smallest_faithful
from .validate import faithfulness, size_curve, units_needed

__all__ = ["Circuit", "ReadoutConfig", "SizeSearch", "ablate_units", "agreement",
           "faithfulness", "patch_units", "read_circuit", "select", "size_curve",
           "smallest_faithful", "units_needed"]
