"""Triton kernels, one module per op family; importing this package registers them as backend ``triton``."""
from . import channel_attention  # noqa: F401
from . import expert_stage  # noqa: F401
from . import norm_conv  # noqa: F401
from . import routing  # noqa: F401
from . import window_attention  # noqa: F401
