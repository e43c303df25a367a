"""Hand-written autograd kernels: blockwise sparse attention, the fused linear cross-entropy."""
