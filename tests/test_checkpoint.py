"""Checkpoint round trips (Lightning-style and plain) and the errors users get for bad files."""
import argparse
import os
import zipfile

import pytest
import torch

from moce_kernels import MoCEIR
from moce_kernels.model.checkpoint import AssumedConfigWarning, CheckpointError

from _models import FILES, load_data, model_for


def _lightning_ckpt(model, path, hparams):
    sd = {"net." + k: v for k, v in model.state_dict().items()}
    torch.save({"epoch": 3, "global_step": 100, "pytorch-lightning_version": "2.1.0", "state_dict": sd,
                "hyper_parameters": hparams, "optimizer_states": [], "lr_schedulers": []}, path)


@pytest.mark.parametrize("name", FILES)
def test_lightning_roundtrip_with_namespace_hparams(tmp_path, reference_dir, name):
    data = load_data(reference_dir, name)
    model = model_for(data)
    path = tmp_path / "model.ckpt"
    _lightning_ckpt(model, path, {"opt": argparse.Namespace(lr=2e-4, topk=data["config"]["topk"], batch_size=8)})
    loaded = MoCEIR.from_checkpoint(path).eval()
    assert loaded.adapters()[0].top_k == data["config"]["topk"], "topk comes from the hyper-parameters"
    x = torch.randn(1, 3, 24, 24)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_plain_state_dict_roundtrip_and_kwargs(tmp_path, reference_dir):
    data = load_data(reference_dir, FILES[1])
    model = model_for(data)
    path = tmp_path / "plain.pth"
    torch.save(model.state_dict(), path)
    loaded = MoCEIR.from_checkpoint(path, topk=2).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("preset", ["MoCE_IR_S", "MoCE_IR"])
def test_preset_inferred_from_shapes(tmp_path, preset):
    model = MoCEIR.from_preset(preset)
    path = tmp_path / "m.ckpt"
    _lightning_ckpt(model, path, {})
    loaded = MoCEIR.from_checkpoint(path)
    assert loaded.patch_embed.proj.weight.shape[0] == model.patch_embed.proj.weight.shape[0]
    for (k, a), (_, b) in zip(loaded.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        MoCEIR.from_checkpoint(tmp_path / "nope.ckpt")


def test_corrupt_and_truncated_files(tmp_path, reference_dir):
    bad = tmp_path / "garbage.ckpt"
    for _ in range(100):  # random bytes fail inside the legacy unpickler in many ways (~6% were not caught)
        bad.write_bytes(os.urandom(4096))
        with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
            MoCEIR.from_checkpoint(bad)
    good = tmp_path / "good.pth"
    torch.save(model_for(load_data(reference_dir, FILES[0])).state_dict(), good)
    blob = good.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        MoCEIR.from_checkpoint(cut)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_arbitrary_code_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="cannot be loaded safely \\(Trying to load unsupported GLOBAL") as e:
        MoCEIR.from_checkpoint(path)
    assert "weights_only" not in str(e.value), "never pass on the advice to load with weights_only=False"


def test_mismatched_preset_names_keys_shapes_and_lookalike(tmp_path):
    path = tmp_path / "s.ckpt"
    _lightning_ckpt(MoCEIR.from_preset("MoCE_IR_S"), path, {})
    with pytest.raises(CheckpointError) as e:
        MoCEIR.from_checkpoint(path, preset="MoCE_IR")
    msg = str(e.value)
    assert "shape mismatches" in msg and "patch_embed.proj.weight" in msg
    assert "looks like preset 'MoCE_IR_S'" in msg


def test_missing_and_unexpected_keys(tmp_path, reference_dir):
    model = model_for(load_data(reference_dir, FILES[0]))
    sd = model.state_dict()
    sd.pop("refinement.layers.0.ffn.dwconv.weight")
    sd["extra.thing"] = torch.zeros(2)
    path = tmp_path / "x.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as e:
        MoCEIR.from_checkpoint(path)
    msg = str(e.value)
    assert "1 missing keys: refinement.layers.0.ffn.dwconv.weight" in msg
    assert "1 unexpected keys: extra.thing" in msg


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="no state dict"):
        MoCEIR.from_checkpoint(path)
    path2 = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(3)}, path2)
    with pytest.raises(CheckpointError, match="not a MoCE-IR state dict"):
        MoCEIR.from_checkpoint(path2)


def _flip_inside_largest_record(src, dst, n_bytes: int = 64) -> str:
    """Copy ``src`` (a zip-format .pt) to ``dst`` with ``n_bytes`` flipped inside its largest tensor record."""
    with zipfile.ZipFile(src) as z:
        rec = max(z.infolist(), key=lambda i: i.file_size)
    blob = bytearray(open(src, "rb").read())
    start = rec.header_offset + 30 + len(rec.filename.encode()) + len(rec.extra) + rec.file_size // 2
    for i in range(n_bytes):
        blob[start + i] ^= 0xFF
    open(dst, "wb").write(bytes(blob))
    return rec.filename


def test_flipped_bytes_in_a_tensor_record_are_caught(tmp_path, reference_dir):
    good, bad = tmp_path / "good.pth", tmp_path / "bad.pth"
    torch.save(model_for(load_data(reference_dir, FILES[0])).state_dict(), good)
    record = _flip_inside_largest_record(good, bad)
    assert torch.load(bad, weights_only=True).keys(), "torch.load alone reads the damaged file without error"
    with pytest.raises(CheckpointError, match=f"corrupt: the data of its record '{record}' does not match"):
        MoCEIR.from_checkpoint(bad)


def test_empty_and_foreign_files_without_pytorch_advice(tmp_path):
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty \\(0 bytes\\)"):
        MoCEIR.from_checkpoint(empty)
    for i, blob in enumerate((b"hello\n" * 50, os.urandom(4096), b"\x80\x02" + os.urandom(200))):
        path = tmp_path / f"foreign{i}.pt"
        path.write_bytes(blob)
        with pytest.raises(CheckpointError) as e:
            MoCEIR.from_checkpoint(path)
        assert "weights_only" not in str(e.value) and "not a readable PyTorch checkpoint" in str(e.value)


def test_non_string_keys(tmp_path):
    path = tmp_path / "int_keys.pt"
    torch.save({1: torch.ones(3), "a": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="keys must be parameter names \\(strings\\); got 1 other keys: "
                                              "\\['1 \\(int\\)'\\]"):
        MoCEIR.from_checkpoint(path)


def _saved_state_dict(tmp_path, sd, name="sd.pth"):
    path = tmp_path / name
    torch.save(sd, path)
    return path


PARTIAL = {  # how a state dict is cut -> the key the error must name
    "no latent": (lambda sd: {k: v for k, v in sd.items() if not k.startswith("latent.")},
                  "latent.layers.0.mixer.temperature"),
    "no decoder": (lambda sd: {k: v for k, v in sd.items() if not k.startswith("dec.")},
                   "dec.0.2.layers.0.adapter.proj_out.weight"),
    "no encoder level 1": (lambda sd: {k: v for k, v in sd.items() if not k.startswith("enc.1.")},
                           "enc.1.0.layers.0.mixer.temperature"),
    "no ffn": (lambda sd: {k: v for k, v in sd.items() if "enc.0.0.layers.0.ffn" not in k},
               "enc.0.0.layers.0.ffn.project_out.weight"),
    "experts without proj_out": (lambda sd: {k: v for k, v in sd.items() if "dec.0.2.layers.0.adapter.proj_out" not in k},
                                 "dec.0.2.layers.0.adapter.proj_out.weight"),
}


@pytest.mark.parametrize("case", sorted(PARTIAL))
def test_partial_state_dicts_name_the_missing_key(tmp_path, case):
    cut, key = PARTIAL[case]
    path = _saved_state_dict(tmp_path, cut(MoCEIR(dim=8, num_blocks=[1, 1, 1, 1]).state_dict()))
    with pytest.raises(CheckpointError, match=f"{path}: not a complete MoCE-IR state dict: missing {key!r}"):
        MoCEIR.from_checkpoint(path)


def test_foreign_state_dicts_are_checkpoint_errors(tmp_path):
    restormer_like = {"patch_embed.proj.weight": torch.zeros(48, 3, 3, 3), "output.weight": torch.zeros(3, 96, 3, 3),
                      "encoder_level1.0.attn.temperature": torch.zeros(1, 1, 1)}
    cases = [  # (state dict, what the message names)
        (restormer_like, "missing 'latent.layers.0.mixer.temperature'"),
        ({"patch_embed.proj.weight": torch.zeros(8), "output.weight": torch.zeros(3, 8, 3, 3)},
         r"patch_embed.proj.weight has shape \(8,\); a MoCE-IR state dict holds a 4-d tensor there"),
        ({"patch_embed.proj.weight": torch.zeros(0, 3, 3, 3), "output.weight": torch.zeros(3, 0, 3, 3)},
         r"patch_embed.proj.weight has shape \(0, 3, 3, 3\)"),
        (dict(MoCEIR(dim=8, num_blocks=[1, 1, 1, 1]).state_dict(),
              **{"latent.layers.0.mixer.temperature": torch.zeros(())}),
         r"latent.layers.0.mixer.temperature has shape \(\)"),
    ]
    for i, (sd, named) in enumerate(cases):
        path = _saved_state_dict(tmp_path, sd, f"foreign{i}.pth")
        with pytest.raises(CheckpointError, match=named) as e:
            MoCEIR.from_checkpoint(path)
        assert type(e.value) is CheckpointError and str(path) in str(e.value)


def test_torch_save_named_safetensors_loads(tmp_path):
    """torch.load picks its reader by the name: files are recognised by their content instead."""
    model = MoCEIR(dim=8, num_blocks=[1, 1, 1, 1]).eval()
    for legacy in (False, True):
        path = tmp_path / f"pickled{legacy}.safetensors"
        torch.save(model.state_dict(), path, _use_new_zipfile_serialization=not legacy)
        with pytest.warns(AssumedConfigWarning):
            loaded = MoCEIR.from_checkpoint(path, strict=False).eval()
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k
