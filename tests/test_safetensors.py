"""Checkpoints that keep their configuration: save_checkpoint / from_checkpoint with .safetensors,
the warning for files that do not store it, and moce-convert-ckpt."""
import json
import struct
import warnings

import pytest
import torch

from moce_kernels import MoCEIR
from moce_kernels.cli.convert import main as convert_main
from moce_kernels.model.checkpoint import (SAFETENSORS_CONFIG_KEY, AssumedConfigWarning, CheckpointError,
                                           UnverifiedCheckpointWarning, save_safetensors)

CONFIGS = [  # far from the defaults and from the presets: nothing may come back by accident
    dict(dim=8, num_blocks=[1, 1, 1, 1], num_dec_blocks=[1, 2, 1], heads=[1, 2, 1, 2], topk=2, depth_type="lin",
         stage_depth=[2, 1, 1], rank_type="constant", rank=3, with_complexity=False, complexity_scale="min",
         LayerNorm_type="BiasFree", bias=True, ffn_expansion_factor=1.5, num_refinement_blocks=2,
         routing_noise="never"),
    dict(dim=12, levels=3, heads=[1, 1, 2], num_blocks=[1, 1, 2], num_dec_blocks=[1, 1], stage_depth=[1, 2],
         depth_type=2, rank_type="spread", num_experts=3, topk=3, with_complexity=True, routing_noise="always"),
]


def _same_model(a: MoCEIR, b: MoCEIR) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    a.routing_noise = b.routing_noise = "never"
    x = torch.rand(1, 3, 16, 24)
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))


@pytest.mark.parametrize("config", CONFIGS, ids=["levels4", "levels3"])
def test_safetensors_round_trip_keeps_the_configuration(tmp_path, config):
    torch.manual_seed(0)
    model = MoCEIR(**config)
    path = tmp_path / "model.bin"  # recognised by its header, not its name
    model.save_checkpoint(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is assumed
        loaded = MoCEIR.from_checkpoint(path)
    assert loaded.config == model.config
    for key, value in config.items():
        assert loaded.config[key] == value, key
    _same_model(loaded, model)


def test_corrupt_safetensors_is_a_clear_error(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "m.safetensors"
    MoCEIR(**CONFIGS[1]).save_checkpoint(path)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) - 100])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        MoCEIR.from_checkpoint(path)


def test_plain_state_dict_warns_naming_each_assumed_argument(tmp_path):
    torch.manual_seed(0)
    model = MoCEIR(**CONFIGS[0])
    path = tmp_path / "plain.pth"
    torch.save(model.state_dict(), path)
    with pytest.warns(AssumedConfigWarning) as record:
        MoCEIR.from_checkpoint(path, strict=False)
    message = str(record[0].message)
    for assumed in ("topk=1", "depth_type='constant'", "stage_depth=[1, 1, 1]", "with_complexity=True",
                    "complexity_scale='max'"):
        assert assumed in message, (assumed, message)
    given = dict(topk=2, depth_type="lin", stage_depth=[2, 1, 1], with_complexity=False, complexity_scale="min",
                 rank=3)
    with pytest.warns(AssumedConfigWarning) as record:
        MoCEIR.from_checkpoint(path, topk=2)
    assert "topk" not in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = MoCEIR.from_checkpoint(path, **given)
    _same_model(loaded, model)


def test_convert_command_writes_a_self_describing_file(tmp_path, capsys):
    torch.manual_seed(0)
    model = MoCEIR(**CONFIGS[0])
    src = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"net." + k: v for k, v in model.state_dict().items()}, "epoch": 1}, src)
    dst = tmp_path / "converted.safetensors"
    sets = ["--set", "topk=2", "--set", "depth_type=lin", "--set", "stage_depth=[2,1,1]", "--set",
            "with_complexity=false", "--set", "complexity_scale=min", "--set", "rank=3"]
    assert convert_main([str(src), str(dst)] + sets) == 0
    assert "wrote" in capsys.readouterr().out
    _same_model(MoCEIR.from_checkpoint(dst), model)
    assert convert_main([str(src), str(dst)]) == 2, "an existing output needs --force"
    assert "exists" in capsys.readouterr().err
    assert convert_main([str(dst), str(dst), "--force"]) == 2, "never over its own input"
    assert convert_main([str(tmp_path / "missing.ckpt"), str(tmp_path / "x.safetensors")]) == 2
    assert "not found" in capsys.readouterr().err


def _tiny_file(tmp_path, name="m.safetensors"):
    torch.manual_seed(0)
    model = MoCEIR(**CONFIGS[1])
    path = tmp_path / name
    model.save_checkpoint(path)
    return model, path


def _header_length(blob: bytes) -> int:
    return struct.unpack("<Q", blob[:8])[0]


DAMAGE = {  # safetensors' own reader raised SafetensorError for these, or torch.load did (by the name)
    "zeroed": lambda b: bytes(len(b)),
    "zeroed header": lambda b: bytes(8 + _header_length(b)) + b[8 + _header_length(b):],
    "header cut": lambda b: b[: 8 + _header_length(b) // 2],
    "length cut": lambda b: b[:5],
    "length too big": lambda b: struct.pack("<Q", _header_length(b) + 10) + b[8:],
    "length too small": lambda b: struct.pack("<Q", _header_length(b) - 10) + b[8:],
    "length absurd": lambda b: struct.pack("<Q", 2 ** 62) + b[8:],
    "data cut": lambda b: b[:-100],
    "data extra": lambda b: b + bytes(16),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_safetensors_are_checkpoint_errors(tmp_path, case):
    _, path = _tiny_file(tmp_path)
    path.write_bytes(DAMAGE[case](path.read_bytes()))
    with pytest.raises(CheckpointError, match="not a readable safetensors file") as e:
        MoCEIR.from_checkpoint(path)
    assert str(path) in str(e.value)


def test_one_flipped_bit_in_a_tensor_is_caught(tmp_path):
    model, path = _tiny_file(tmp_path)
    blob = bytearray(path.read_bytes())
    header = json.loads(blob[8: 8 + _header_length(blob)])
    name = "dec.1.2.layers.0.adapter.proj_out.weight"
    start = 8 + _header_length(blob) + header[name]["data_offsets"][0]
    blob[start + 5] ^= 0x40  # an exponent bit of one float32
    path.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=f"{path}: tensor {name!r} does not match its stored CRC-32"):
        MoCEIR.from_checkpoint(path)


def test_a_changed_stored_configuration_is_caught(tmp_path):
    _, path = _tiny_file(tmp_path)
    blob = path.read_bytes()
    assert b'\\"topk\\": 3' in blob
    path.write_bytes(blob.replace(b'\\"topk\\": 3', b'\\"topk\\": 2'))  # same length: a valid file
    with pytest.raises(CheckpointError, match="stored model configuration does not match its stored CRC-32"):
        MoCEIR.from_checkpoint(path)


def test_a_file_without_checksums_loads_with_a_warning_naming_it(tmp_path):
    from safetensors.torch import save_file
    model, path = _tiny_file(tmp_path)
    plain = tmp_path / "by_others.safetensors"
    save_file(model.state_dict(), plain, metadata={SAFETENSORS_CONFIG_KEY: json.dumps(model.config)})
    with pytest.warns(UnverifiedCheckpointWarning, match=f"{plain} stores no checksums"):
        loaded = MoCEIR.from_checkpoint(plain)
    _same_model(loaded, model)


BAD_CONFIGS = [  # stored values -> the argument the error names; refused before anything is built
    (dict(ffn_expansion_factor="2"), "ffn_expansion_factor"),
    (dict(dim=2 ** 20), "dim"),
    (dict(levels=40), "levels"),
    (dict(num_blocks=[1, 1, 10 ** 9]), "num_blocks"),
    (dict(heads="112"), "heads"),
    (dict(num_experts=10 ** 6), "num_experts"),
    (dict(inp_channels=10 ** 7, out_channels=10 ** 7), "inp_channels"),
    (dict(rank_type="exp", rank=10 ** 4), "rank_type = 'exp' with rank = 10000"),
    (dict(rank_type="fact", rank=10 ** 6), "rank_type = 'fact' with rank = 1000000"),
    (dict(rank_type="constant", rank="3"), "rank_type = 'constant' with rank = '3'"),
]


@pytest.mark.parametrize("changed, name", BAD_CONFIGS, ids=[n for _, n in BAD_CONFIGS])
def test_stored_configuration_with_wrong_types_or_sizes_is_refused(tmp_path, monkeypatch, changed, name):
    model, path = _tiny_file(tmp_path)
    save_safetensors(model.state_dict(), path, dict(model.config, **changed))

    def no_conv(*args, **kwargs):
        raise AssertionError("a layer was built before the stored configuration was checked")
    monkeypatch.setattr(torch.nn.Conv2d, "__init__", no_conv)
    with pytest.raises(CheckpointError, match=f"{path}: the stored model configuration does not fit its tensors: "
                                              f".*{name}") as e:
        MoCEIR.from_checkpoint(path)
    assert type(e.value) is CheckpointError
