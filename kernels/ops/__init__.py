"""One module per fused op: Triton kernel(s) and the autograd.Function around them."""
