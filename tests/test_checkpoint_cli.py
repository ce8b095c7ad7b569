"""Both console scripts refuse a bad checkpoint in one line with exit status 2 (the README's promise for
a refused run), whatever is wrong with the file: never a traceback."""
import struct

import cv2
import numpy as np
import pytest
import torch

from moce_kernels import MoCEIR
from moce_kernels.cli.convert import main as convert_main
from moce_kernels.cli.restore import main as restore_main
from moce_kernels.model.checkpoint import save_safetensors

TINY = dict(dim=8, num_blocks=[1, 1, 1, 1])


def _safetensors(path):
    MoCEIR(**TINY).save_checkpoint(path)
    return path.read_bytes()


def _zeroed(path):
    path.write_bytes(bytes(len(_safetensors(path))))


def _header_cut(path):
    blob = _safetensors(path)
    path.write_bytes(blob[: 8 + struct.unpack("<Q", blob[:8])[0] // 2])


def _flipped_bit(path):
    blob = bytearray(_safetensors(path))
    blob[-7] ^= 0x40
    path.write_bytes(bytes(blob))


def _string_expansion(path):
    model = MoCEIR(**TINY)
    save_safetensors(model.state_dict(), path, dict(model.config, ffn_expansion_factor="2"))


def _partial(path):
    torch.save({k: v for k, v in MoCEIR(**TINY).state_dict().items() if not k.startswith("latent.")}, path)


def _foreign(path):
    torch.save({"patch_embed.proj.weight": torch.zeros(8), "output.weight": torch.zeros(3, 8, 3, 3)}, path)


def _garbage(path):
    path.write_bytes(b"\x80\x02" + bytes(range(256)) * 4)


def _folder(path):
    path.mkdir()


BAD = {"zeroed.safetensors": _zeroed, "header_cut.safetensors": _header_cut, "flipped.safetensors": _flipped_bit,
       "expansion.safetensors": _string_expansion, "partial.pth": _partial, "foreign.pth": _foreign,
       "garbage.ckpt": _garbage, "folder.ckpt": _folder, "missing.ckpt": lambda path: None}


def _one_line_refusal(captured, path) -> None:
    lines = [line for line in captured.err.splitlines() if line.strip() and not line.startswith("warning:")]
    assert len(lines) == 1 and path.name in lines[0], captured.err
    assert "Traceback" not in captured.err + captured.out


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_ckpt_is_one_line_and_exit_2(tmp_path, capsys, name):
    path = tmp_path / name
    BAD[name](path)
    image = tmp_path / "in.png"
    assert cv2.imwrite(str(image), np.full((16, 16, 3), 100, np.uint8))
    assert restore_main([str(image), "--ckpt", str(path), "--out", str(tmp_path / "out")]) == 2
    _one_line_refusal(capsys.readouterr(), path)
    assert convert_main([str(path), str(tmp_path / "converted.safetensors")]) == 2
    _one_line_refusal(capsys.readouterr(), path)
    assert not (tmp_path / "converted.safetensors").exists()
