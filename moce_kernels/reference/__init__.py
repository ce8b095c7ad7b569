"""Pure-PyTorch implementations of every op: the oracle, and the CPU path."""
from . import expert_conv, expert_stage, routing, window_attention  # noqa: F401  (registers the implementations)
