"""The authors' released configurations."""
from __future__ import annotations

from typing import Any, Dict

_COMMON: Dict[str, Any] = dict(
    num_blocks=[4, 6, 6, 8], num_dec_blocks=[2, 4, 4], levels=4, heads=[1, 2, 4, 8], num_refinement_blocks=4,
    topk=1, num_experts=4, rank=2, with_complexity=True, depth_type="constant", stage_depth=[1, 1, 1],
    rank_type="spread", complexity_scale="max", ffn_expansion_factor=2, LayerNorm_type="WithBias", bias=False,
)

PRESETS: Dict[str, Dict[str, Any]] = {
    "MoCE_IR": dict(_COMMON, dim=48),
    "MoCE_IR_S": dict(_COMMON, dim=32),
}

PARAM_COUNTS = {"MoCE_IR": 25_353_796, "MoCE_IR_S": 11_477_752}


def preset_config(name: str) -> Dict[str, Any]:
    """A copy of preset ``name``'s constructor arguments."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return {k: (list(v) if isinstance(v, list) else v) for k, v in PRESETS[name].items()}
