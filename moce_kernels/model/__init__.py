"""nn.Modules of MoCE-IR: the model, its blocks and layers, presets and checkpoint loading."""
from .moce_ir import MoCEIR
from .presets import PRESETS, preset_config

__all__ = ["MoCEIR", "PRESETS", "preset_config"]
