"""ONNX export (moce_kernels.onnx): the graph in ONNX Runtime and OpenVINO against the eager model.

Each configuration is exported once per module (tracing is the slow part) and run at several
sizes, batch > 1 with images that route differently, in both runtimes. fp32: within 1e-4 of the eager
model on images in [0, 1]. fp16 (ONNX Runtime): the error rule of DESIGN.md against the float64 model.
"""
import json
import os

import numpy as np
import pytest
import torch

from moce_kernels import MoCEIR, export_onnx
from moce_kernels.model.moce_ir import _pad_reflect
from moce_kernels.onnx import ExportError, reflect_pad_to_multiple
from moce_kernels.onnx.runtime import OnnxTileRunner

from _models import load_data, model_for

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")
pytest.importorskip("onnxscript")

ATOL = 1e-4
SIZES = [(1, 32, 32), (1, 21, 30), (3, 37, 45), (2, 64, 17)]  # (B, H, W): sides not divisible by 8 included


def _images(b: int, h: int, w: int) -> torch.Tensor:
    """b images in [0, 1] of different character (noise, smooth ramps, darkened noise), so that they
    route differently."""
    base = torch.rand(b, 3, h, w)
    ramp = torch.linspace(0, 1, w).expand(3, h, w)
    for i in range(1, b):
        base[i] = ramp * base[i].mean() if i % 2 else base[i] * 0.2
    return base


def _routes(model: MoCEIR, x: torch.Tensor):
    with torch.no_grad(), model.record_routes() as routes:
        model(x)
    return routes


def _check_margins(model: MoCEIR, x: torch.Tensor) -> None:
    """No MoCE layer's top-k choice is a near-tie (a 1e-7 difference could flip it between runtimes)."""
    for name, r in _routes(model, x).items():
        scores = r.logits.softmax(-1).sort(-1, descending=True).values
        k = r.indices.shape[1]
        if k < scores.shape[1]:
            margin = float((scores[:, k - 1] - scores[:, k]).min())
            assert margin > 1e-5, f"near-tie at {name} ({margin}); redraw"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, reference_dir):
    """name -> (eager model, path of its fp32 export)."""
    out = {}
    tmp = tmp_path_factory.mktemp("onnx")
    for name in ("official_tiny_top1.pt", "official_tiny_top2.pt"):
        model = model_for(load_data(reference_dir, name))
        path = tmp / (name[:-3] + ".onnx")
        export_onnx(model, path)
        out[name] = (model, path)
    return out


@pytest.mark.parametrize("name", ["official_tiny_top1.pt", "official_tiny_top2.pt"])
@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_runtime_matches_eager(exported, name, runtime):
    model, path = exported[name]
    runner = OnnxTileRunner(path, runtime)
    for b, h, w in SIZES:
        x = _images(b, h, w)
        _check_margins(model, x)
        with torch.no_grad():
            want = model(x)
        got = runner(x)
        assert got.shape == want.shape
        err = (got - want).abs().max().item()
        assert err <= ATOL, f"{runtime} {name} at {(b, h, w)}: max error {err}"


def test_batch_routes_differ_and_match_alone(exported):
    """The batch test above means something: its images take different experts, and each image of a
    batch gets from the graph what it gets alone."""
    model, path = exported["official_tiny_top2.pt"]
    x = _images(3, 37, 45)
    routes = _routes(model, x)
    assert any(len({tuple(row) for row in r.indices.tolist()}) > 1 for r in routes.values()), \
        "the batch's images route identically; the test images need more contrast"
    runner = OnnxTileRunner(path, "onnxruntime")
    batch = runner(x)
    for i in range(3):
        alone = runner(x[i:i + 1])
        assert (batch[i] - alone[0]).abs().max().item() <= 1e-5


def test_graph_is_standard_and_dynamic(exported):
    model, path = exported["official_tiny_top1.pt"]
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert not {"DFT", "STFT"} & {n.op_type for n in proto.graph.node}
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param != "" for d in dims] == [True, False, True, True]  # B, H, W symbolic; 3 channels


def test_unchosen_expert_contributes_nothing(exported):
    """Poison the expert an image does not choose with NaN weights: the output stays finite and equal."""
    model, _ = exported["official_tiny_top1.pt"]
    x = _images(1, 24, 24)
    routes = _routes(model, x)
    name, route = next(iter(routes.items()))
    layer = dict(model.named_modules())[name]
    unused = next(e for e in range(layer.num_experts) if e not in route.indices[0].tolist())
    poisoned = MoCEIR(**model.config)
    poisoned.load_state_dict(model.state_dict())
    poisoned.eval()
    with torch.no_grad():
        dict(poisoned.named_modules())[name].experts[unused][0].proj[2].weight.fill_(float("nan"))
    from moce_kernels.onnx.lowerings import LOWERINGS  # the lowering itself, run eagerly
    from moce_kernels.onnx import lowered_ops
    with torch.no_grad(), lowered_ops():
        got = poisoned(x)
    with torch.no_grad():
        want = model(x)
    assert "moe_experts" in LOWERINGS and torch.isfinite(got).all()
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("n", list(range(1, 20)))
def test_graph_padding_is_the_model_padding(n):
    x = torch.rand(1, 2, n, n + 3)
    assert torch.equal(reflect_pad_to_multiple(x, 8), _pad_reflect(x, 8))


def test_lowerings_eager_match_reference_model(reference_dir):
    """Each lowering, run eagerly inside the model (float64), gives the model's own output."""
    from moce_kernels.onnx import lowered_ops
    model = model_for(load_data(reference_dir, "official_tiny_top2.pt")).double()
    x = _images(2, 27, 50).double()
    with torch.no_grad():
        want = model(x)
        with lowered_ops():
            got = model(x)
    assert (got - want).abs().max().item() <= 1e-10


def test_window_attention_lowering_matches_reference():
    from moce_kernels.onnx.lowerings import window_fft_attention
    from moce_kernels.reference.window_attention import window_fft_attention as ref
    for p in (4, 8, 16, 32):
        q, k, v = (torch.randn(2, 3, 37, 45, dtype=torch.float64) for _ in range(3))
        w, b = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
        assert (window_fft_attention(q, k, v, p, w, b) - ref(q, k, v, p, w, b)).abs().max().item() < 1e-10


def test_preset_structure_small_width(tmp_path, reference_dir):
    """The released presets' structure (blocks, heads, spread ranks, complexity routing) at width 8,
    with the released checkpoint's state_dict keys; exported and run in both runtimes."""
    with open(os.path.join(reference_dir, "official_state_dict_layout.json")) as f:
        layout = json.load(f)
    model = MoCEIR.from_preset("MoCE_IR_S", dim=8).eval()
    for preset in layout.values():
        keys = [k for k, _, _ in preset["state_dict"]] if isinstance(preset, dict) else None
        if keys is not None:
            assert list(model.state_dict()) == keys
    path = tmp_path / "preset.onnx"
    export_onnx(model, path)
    x = _images(2, 35, 43)
    _check_margins(model, x)
    with torch.no_grad():
        want = model(x)
    for runtime in ("onnxruntime", "openvino"):
        err = (OnnxTileRunner(path, runtime)(x) - want).abs().max().item()
        assert err <= ATOL, f"{runtime}: max error {err}"


def test_fp16_export_within_error_rule(tmp_path, reference_dir):
    """fp16 graph in ONNX Runtime vs the float64 model: error <= 2x the fp16 eager model's + 1e-3."""
    model = model_for(load_data(reference_dir, "official_tiny_top1.pt"))
    path = tmp_path / "fp16.onnx"
    export_onnx(model, path, dtype=torch.float16)
    x = _images(2, 29, 40)
    with torch.no_grad():
        exact = MoCEIR(**model.config).double().eval()
        exact.load_state_dict(model.state_dict())
        want = exact(x.double())
        half = MoCEIR(**model.config).half().eval()
        half.load_state_dict(model.state_dict())
        half_err = (half(x.half()).double() - want).abs().max().item()
    got = OnnxTileRunner(path, "onnxruntime")(x.half()).double()
    err = (got - want).abs().max().item()
    assert err <= 2 * half_err + 1e-3, f"fp16 graph error {err}, fp16 eager error {half_err}"


def test_export_errors(tmp_path, reference_dir):
    model = model_for(load_data(reference_dir, "official_tiny_top1.pt"))
    with pytest.raises(ExportError, match="training mode"):
        export_onnx(model.train(), tmp_path / "a.onnx")
    model.eval()
    with pytest.raises(ExportError, match="dtype"):
        export_onnx(model, tmp_path / "a.onnx", dtype=torch.bfloat16)
    with pytest.raises(ExportError, match="opset"):
        export_onnx(model, tmp_path / "a.onnx", opset=13)
    model.routing_noise = "always"
    with pytest.raises(ExportError, match="routing_noise"):
        export_onnx(model, tmp_path / "a.onnx")
    model.routing_noise = "train"
    with pytest.raises(ExportError, match="MoCEIR"):
        export_onnx(torch.nn.Conv2d(3, 3, 1), tmp_path / "a.onnx")
    with model.record_routes():
        with pytest.raises(ExportError, match="record_routes"):
            export_onnx(model, tmp_path / "a.onnx")
    assert not (tmp_path / "a.onnx").exists()


def test_runner_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        OnnxTileRunner(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="runtime must be one of"):
        OnnxTileRunner(tmp_path / "missing.onnx", "tensorrt")
