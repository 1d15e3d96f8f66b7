"""Circuits: channel / head-level graphs read from a (minimal) explanation, validated by
ablation and patching."""
from .circuit import Circuit
from .readout import read_circuit, select
from .validate import faithfulness, size_curve

__all__ = ["Circuit", "faithfulness", "read_circuit", "select", "size_curve"]
