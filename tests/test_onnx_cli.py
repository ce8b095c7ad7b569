"""moce-export (a save_checkpoint .safetensors, no other argument) and moce-restore --runtime."""
import cv2
import numpy as np
import pytest
import torch

from moce_kernels import restore
from moce_kernels.cli.export import main as export_main
from moce_kernels.cli.restore import main as restore_main
from moce_kernels.onnx.runtime import OnnxTileRunner

from _models import load_data, model_for

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, reference_dir):
    """(eager model, its .safetensors, the .onnx that moce-export wrote from it)."""
    tmp = tmp_path_factory.mktemp("cli")
    model = model_for(load_data(reference_dir, "official_tiny_top2.pt"))
    src, dst = tmp / "tiny.safetensors", tmp / "tiny.onnx"
    model.save_checkpoint(src)
    assert export_main([str(src), str(dst)]) == 0
    return model, src, dst


def test_export_cli_from_safetensors(exported):
    model, _, dst = exported
    x = torch.rand(2, 3, 27, 35)
    with torch.no_grad():
        want = model(x)
    runner = OnnxTileRunner(dst, "onnxruntime")
    assert runner.config["dim"] == model.config["dim"] and runner.pad_multiple == model.pad_multiple
    assert (runner(x) - want).abs().max().item() <= 1e-4


def test_export_cli_refuses(exported, tmp_path, capsys):
    _, src, dst = exported
    assert export_main([str(src), str(dst)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert export_main([str(tmp_path / "missing.safetensors"), str(tmp_path / "x.onnx")]) == 2
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_restore_cli_runtime_tiles_like_restore(exported, tmp_path, runtime):
    """--runtime: the same tiles and blending as restore(model, routing='tile'), the graph running them."""
    model, _, dst = exported
    src = tmp_path / "in"
    src.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    assert cv2.imwrite(str(src / "a.png"), pixels)
    out = tmp_path / "out"
    rc = restore_main([str(src / "a.png"), "--ckpt", str(dst), "--runtime", runtime, "--out", str(out),
                       "--tile", "32", "--overlap", "8", "--no-progress"])
    assert rc == 0
    got = cv2.imread(str(out / "a.png"), cv2.IMREAD_UNCHANGED)
    image = torch.from_numpy(pixels[:, :, ::-1].copy()).permute(2, 0, 1)[None].float() / 255
    want = restore(model, image, tile=32, overlap=8, routing="tile")[0].clamp(0, 1)
    want = (want.permute(1, 2, 0).numpy()[:, :, ::-1] * 255).round()
    assert got.shape == pixels.shape
    assert np.abs(got.astype(np.float64) - want).max() <= 1


def test_restore_cli_runtime_refuses_torch_options(exported, tmp_path, capsys):
    _, _, dst = exported
    (tmp_path / "a.png").write_bytes(b"")
    rc = restore_main([str(tmp_path / "a.png"), "--ckpt", str(dst), "--runtime", "onnxruntime", "--out",
                       str(tmp_path / "out"), "--optimize"])
    assert rc == 2 and "--optimize" in capsys.readouterr().err
