"""Fused Triton kernels (activation-matching loss, edge scoring) with torch reference paths.

Not written yet: they arrive with the kernels issue, once the explanation objective and the
circuit readout that call them exist. Nothing in circuitlab imports this package today.
"""
