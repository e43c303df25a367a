"""Hand-written kernels: blockwise sparse attention, the fused linear cross-entropy, Ascend's
fused attention."""
