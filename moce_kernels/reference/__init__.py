"""Pure-PyTorch implementations of every op: the oracle, and the CPU path."""
from . import expert_conv, norm_conv, routing, window_attention  # noqa: F401  (registers the implementations)
