"""state_dict layout and parameter counts of both presets, against the authors' layout file."""
import json
import os

import pytest

from moce_kernels import MoCEIR
from moce_kernels.model.presets import PARAM_COUNTS


@pytest.fixture(scope="module")
def layout(reference_dir):
    with open(os.path.join(reference_dir, "official_state_dict_layout.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("preset", ["MoCE_IR", "MoCE_IR_S"])
def test_state_dict_matches_layout(layout, preset):
    model = MoCEIR.from_preset(preset)
    got = [(k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()]
    want = [(k, list(s), d) for k, s, d in layout[preset]["state_dict"]]
    assert len(got) == len(want) == 1262
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"entry {i}: {g} != {w}"
    n = sum(p.numel() for p in model.parameters())
    assert n == layout[preset]["num_params"] == PARAM_COUNTS[preset]


@pytest.mark.parametrize("preset", ["MoCE_IR", "MoCE_IR_S"])
def test_preset_config_matches_layout(layout, preset):
    from moce_kernels.model.presets import preset_config
    cfg = preset_config(preset)
    for k, v in layout[preset]["config"].items():
        assert cfg[k] == v, k
