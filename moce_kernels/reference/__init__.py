"""Pure-PyTorch implementations of every op: the oracle, and the CPU path."""
from . import channel_attention, expert_conv, expert_stage, norm_conv, routing, window_attention  # noqa: F401
