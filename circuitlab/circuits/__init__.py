"""Circuits: channel / head-level graphs read from a (minimal) explanation, validated by
ablation and patching."""
from .circuit import Circuit
from .classes import ClassCircuit, class_circuit
from .config import ReadoutConfig
from .patching import ablate_units, agreement, patch_units
from .edge_circuit import EdgeSearch, edge_attribution, smallest_edge_circuit
from .frontier import frontier, smallest
from .ranking import RANKINGS, rank_units
from .readout import read_circuit, select
from .search import Setup, SizeSearch, prepare, smallest_faithful
from .validate import faithfulness, size_curve, summarize, units_needed

__all__ = ["Circuit", "ClassCircuit", "EdgeSearch", "RANKINGS", "ReadoutConfig", "Setup", "SizeSearch",
           "ablate_units", "agreement", "class_circuit", "edge_attribution", "faithfulness", "frontier",
           "patch_units", "prepare", "rank_units", "read_circuit", "select", "size_curve",
           "smallest", "smallest_edge_circuit", "smallest_faithful", "summarize",
           "units_needed"]
