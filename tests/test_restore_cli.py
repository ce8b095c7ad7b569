"""moce-restore: files, folders and globs in; outputs that never overwrite inputs; per-file errors."""
import os

import cv2
import numpy as np
import pytest
import torch

import moce_kernels
from moce_kernels import MoCEIR
from moce_kernels.cli.restore import Job, RestoreOptions, main, plan_jobs, restore_file
from moce_kernels.cli._common import UsageError
from moce_kernels.imageio import LUMA, read_image

from test_restore import Pointwise


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    MoCEIR(dim=8, num_blocks=[1, 1, 1, 1]).save_checkpoint(path)
    return str(path)


def _write(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), pixels)


def _snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_folder_run_keeps_structure_reports_bad_files_and_fails_at_the_end(tmp_path, ckpt, capsys):
    rng = np.random.default_rng(0)
    src = tmp_path / "photos"
    _write(src / "a.png", rng.integers(0, 65536, (24, 40, 3), dtype=np.uint16))
    _write(src / "trip" / "b.jpg", rng.integers(0, 256, (16, 24, 3), dtype=np.uint8))
    (src / "trip" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    (src / "empty.tif").write_bytes(b"")
    before = _snapshot(src)
    out = tmp_path / "restored"
    status = main([str(src), "--recursive", "--ckpt", ckpt, "--out", str(out), str(tmp_path / "nope.png")])
    captured = capsys.readouterr()
    assert status == 1
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 3 and all(name in captured.err for name in ("broken.png", "empty.tif", "nope.png"))
    assert "Traceback" not in captured.err
    assert "restored 2 of 5 files" in captured.out
    assert _snapshot(src) == before, "inputs untouched"
    a, b = read_image(out / "a.png"), read_image(out / "trip" / "b.jpg")  # below the one input folder
    assert a.dtype == np.uint16 and a.color.shape == (24, 40, 3)
    assert b.dtype == np.uint8 and b.color.shape == (16, 24, 3)


def test_never_overwrites_an_input(tmp_path, ckpt, capsys):
    src = tmp_path / "in"
    _write(src / "x.png", np.full((16, 16, 3), 100, np.uint8))
    before = _snapshot(src)
    assert main([str(src), "--ckpt", ckpt, "--out", str(src)]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert _snapshot(src) == before
    assert main([str(src / "x.png"), "--ckpt", ckpt, "--out", str(src), "--suffix", "_restored"]) == 0
    assert _snapshot(src)[src / "x.png"] == before[src / "x.png"]
    assert (src / "x_restored.png").exists()


def test_same_names_from_different_folders_cannot_clobber(tmp_path):
    for folder in ("a", "b"):
        _write(tmp_path / folder / "x.png", np.zeros((8, 8, 3), np.uint8))
    _write(tmp_path / "a" / "x.jpg", np.zeros((8, 8, 3), np.uint8))
    inputs = [(str(tmp_path / f / "x.png"), str(tmp_path / f)) for f in ("a", "b")]
    jobs = plan_jobs(inputs, str(tmp_path / "out"))
    assert sorted(j.dst for j in jobs) == [str(tmp_path / "out" / f / "x.png") for f in ("a", "b")]
    with pytest.raises(UsageError, match="would both be written"):
        plan_jobs([(str(tmp_path / "a" / "x.png"), str(tmp_path / "a")),
                   (str(tmp_path / "a" / "x.jpg"), str(tmp_path / "a"))], str(tmp_path / "out"), ext="png")
    same = plan_jobs(inputs + [(str(tmp_path / "a" / ".." / "a" / "x.png"), str(tmp_path / "a"))], str(tmp_path / "o"))
    assert len(same) == 2, "one file given twice is restored once"


def test_16_bit_gray_keeps_the_values_the_model_produced(tmp_path):
    torch.manual_seed(5)
    rng = np.random.default_rng(5)
    gray = rng.integers(0, 65536, (30, 45), dtype=np.uint16)
    _write(tmp_path / "g.tif", gray)
    model = Pointwise()
    job = Job(str(tmp_path / "g.tif"), str(tmp_path / "out" / "g.tif"))
    restore_file(model, job, RestoreOptions(tile=16, overlap=4))
    x = torch.from_numpy(gray.astype(np.float32) / 65535).expand(1, 3, 30, 45)
    with torch.no_grad():
        y = model(x)[0].double().clamp(0, 1).numpy()
    expected = np.rint((LUMA[0] * y[0] + LUMA[1] * y[1] + LUMA[2] * y[2]) * 65535)
    back = read_image(tmp_path / "out" / "g.tif")
    assert back.gray and back.dtype == np.uint16 and np.array_equal(back.color, expected)


def test_optimize_flag(tmp_path, ckpt, capsys, monkeypatch):
    _write(tmp_path / "x.png", np.zeros((16, 16, 3), np.uint8))
    args = [str(tmp_path / "x.png"), "--ckpt", ckpt, "--out", str(tmp_path / "out"), "--optimize"]
    monkeypatch.delattr(moce_kernels, "optimize", raising=False)
    assert main(args) == 2
    assert "moce_kernels.optimize" in capsys.readouterr().err
    seen = []
    monkeypatch.setattr(moce_kernels, "optimize", lambda m: seen.append(m) or m, raising=False)
    assert main(args) == 0 and len(seen) == 1


def test_bad_options_are_refused_in_one_line(tmp_path, ckpt, capsys):
    _write(tmp_path / "x.png", np.zeros((16, 16, 3), np.uint8))
    base = [str(tmp_path / "x.png"), "--out", str(tmp_path / "out")]
    for extra, match in [(["--ckpt", str(tmp_path / "none.ckpt")], "not found"),
                         (["--ckpt", ckpt, "--dtype", "bf16", "--device", "cpu"], "needs a GPU"),
                         (["--ckpt", ckpt, "--backend", "nope"], "nope"),
                         (["--ckpt", ckpt, "--tile", "100"], "multiple of 8"),
                         (["--ckpt", ckpt, "--tile", "64", "--overlap", "40"], "--overlap")]:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert match in err and len(err.strip().splitlines()) == 1, err
