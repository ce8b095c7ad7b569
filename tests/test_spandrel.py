"""MoCE-IR in the real spandrel (moce_kernels.spandrel): detection and loading of the three file kinds
(released Lightning .ckpt, plain .pth, .safetensors) of both presets and of a custom configuration, the
descriptor's call against MoCEIR, reduced precisions, and the ComfyUI custom-node folder.

spandrel needs torchvision, which does not load beside the CPU torch of the main environment: .ci/run
runs this module in the environment python/spandrel_env.sh builds, with MOCE_SPANDREL_TESTS=1 (then a
missing spandrel is an error, not a skip), and leaves it out of the main run.
"""
import argparse
import copy
import importlib.util
import os
import warnings

import pytest
import torch

if os.environ.get("MOCE_SPANDREL_TESTS") == "1":
    import spandrel
else:
    spandrel = pytest.importorskip("spandrel", reason="needs spandrel (the environment of python/spandrel_env.sh)")

import moce_kernels.spandrel as moce_spandrel  # noqa: E402
from moce_kernels import MoCEIR  # noqa: E402
from moce_kernels.model.checkpoint import AssumedConfigWarning, CheckpointError  # noqa: E402
from moce_kernels.testing import assert_within_rule, max_err  # noqa: E402

from _models import FILES, load_data  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("ckpt", "pth", "safetensors")


@pytest.fixture(scope="module", autouse=True)
def installed():
    moce_spandrel.install(ignore_duplicates=True)


def _write(model: MoCEIR, folder, kind: str, hparams=None) -> str:
    """``model`` saved as the released Lightning layout (``net.`` keys, Namespace hyper-parameters), a plain
    state dict or our .safetensors."""
    path = os.path.join(folder, f"model.{kind}")
    if kind == "ckpt":
        torch.save({"epoch": 3, "state_dict": {f"net.{k}": v for k, v in model.state_dict().items()},
                    "hyper_parameters": {"opt": argparse.Namespace(lr=2e-4, batch_size=8, **(hparams or {}))},
                    "optimizer_states": [], "lr_schedulers": []}, path)
    elif kind == "pth":
        torch.save(model.state_dict(), path)
    else:
        model.save_checkpoint(path)
    return path


def _load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AssumedConfigWarning)
        return spandrel.ModelLoader().load_from_file(path)


def _check_descriptor(desc, model: MoCEIR, x: torch.Tensor, want=None) -> torch.Tensor:
    """Check the descriptor's attributes and that its call equals ``model`` on ``x`` (clamped; ``want``:
    that output, computed before); returns the descriptor's output."""
    assert isinstance(desc, spandrel.ImageModelDescriptor)
    assert desc.architecture.id == moce_spandrel.ARCH_ID
    assert (desc.purpose, desc.scale, desc.input_channels, desc.output_channels) == ("Restoration", 1, 3, 3)
    assert desc.size_requirements.none and desc.tiling == spandrel.ModelTiling.SUPPORTED
    assert isinstance(desc.model, MoCEIR)
    if want is None:
        with torch.no_grad():
            want = model(x).clamp(0, 1)
    out = desc(x.clone())
    err = max_err(out, want)
    assert err <= 1e-6, f"descriptor differs from MoCEIR by {err:.2e}"
    return out


@pytest.mark.parametrize("preset", ["MoCE_IR", "MoCE_IR_S"])
def test_presets_load_from_every_file_kind(tmp_path, preset):
    model = MoCEIR.from_preset(preset).eval()
    x = torch.rand(1, 3, 8, 12)  # not a multiple of 8: the model pads itself
    with torch.no_grad():
        want = model(x).clamp(0, 1)
    for kind in KINDS:
        desc = _load(_write(model, tmp_path, kind))
        assert preset in desc.tags, (kind, desc.tags)
        _check_descriptor(desc, model, x, want)
        os.remove(os.path.join(tmp_path, f"model.{kind}"))


def test_custom_configuration_from_every_file_kind(tmp_path, reference_dir):
    """The authors' top-2 test model (dim 16, num_dec_blocks [1, 2, 1]): shapes give its widths and depths,
    the .safetensors file's stored configuration and the .ckpt's hyper-parameters give topk=2, and the
    descriptor reproduces the authors' outputs."""
    data = load_data(reference_dir, FILES[1])
    assert data["config"]["topk"] == 2
    model = MoCEIR(**data["config"]).eval()
    model.load_state_dict(data["state_dict"])
    case = min(data["eval"], key=lambda c: c["input"].numel())
    with torch.no_grad():
        want = model(case["input"]).clamp(0, 1)
    for kind in ("ckpt", "safetensors"):
        desc = _load(_write(model, tmp_path, kind, hparams={"topk": 2}))
        assert desc.model.adapters()[0].top_k == 2 and "top2" in desc.tags, kind
        out = _check_descriptor(desc, model, case["input"], want)
        assert max_err(out, case["output"].clamp(0, 1)) <= 1e-5
    with pytest.warns(AssumedConfigWarning, match="topk=1"):  # a plain state dict cannot say it
        desc = spandrel.ModelLoader().load_from_file(_write(model, tmp_path, "pth"))
    assert desc.model.adapters()[0].top_k == 1


def test_custom_shapes_with_the_released_routing_from_every_file_kind(tmp_path):
    """Widths, depths and blocks of no preset, routing as released: all three kinds give the same model."""
    model = MoCEIR.from_preset("MoCE_IR_S", dim=16, num_blocks=[1, 2, 1, 1], num_dec_blocks=[1, 1, 2],
                               num_refinement_blocks=2, heads=[1, 2, 2, 4]).eval()
    x = torch.rand(1, 3, 12, 20)
    with torch.no_grad():
        want = model(x).clamp(0, 1)
    for kind in KINDS:
        desc = _load(_write(model, tmp_path, kind))
        assert desc.model.config == model.config, kind
        _check_descriptor(desc, model, x, want)


def test_stored_configuration_wins_over_inference(tmp_path):
    """topk and complexity_scale, which no tensor shape shows, come from the file's stored configuration
    (inference alone would assume the released presets' topk=1 and complexity_scale='max')."""
    torch.manual_seed(0)
    model = MoCEIR(dim=8, num_blocks=[1, 1, 1, 1], num_dec_blocks=[1, 1, 1], num_refinement_blocks=1, topk=3,
                   complexity_scale="min").eval()
    desc = spandrel.ModelLoader().load_from_file(_write(model, tmp_path, "safetensors"))
    layer = desc.model.adapters()[0]
    assert layer.top_k == 3 and desc.model.config["complexity_scale"] == "min"
    _check_descriptor(desc, model, torch.rand(1, 3, 13, 21))


def _tiny(folder):
    """A small model (released routing settings) and its descriptor, loaded from its .safetensors file."""
    model = MoCEIR.from_preset("MoCE_IR_S", dim=8, num_blocks=[1, 1, 1, 1], num_dec_blocks=[1, 1, 1],
                               num_refinement_blocks=1).eval()
    return model, spandrel.ModelLoader().load_from_file(_write(model, folder, "safetensors"))


def test_any_size(tmp_path):
    model, desc = _tiny(tmp_path)
    for h, w in ((1, 1), (5, 3), (17, 9)):
        x = torch.rand(1, 3, h, w)
        out = desc(x)
        assert out.shape == x.shape
        assert max_err(out, model(x).clamp(0, 1).detach()) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_within_rule(tmp_path, dtype):
    """The descriptor's flags allow bf16 and fp16; here (CPU) it runs in them within the error rule
    against MoCEIR in float64 (on a GPU, tests/test_model_backends.py holds the kernels to it)."""
    model, desc = _tiny(tmp_path)
    assert desc.supports_bfloat16 and desc.supports_half
    x = torch.rand(1, 3, 16, 12)
    m64, m_lp = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        ref64 = m64.double()(x.double()).clamp(0, 1)
        ref_lp = m_lp.to(dtype)(x.to(dtype)).clamp(0, 1)
    out = desc.to(dtype)(x.to(dtype))
    assert out.dtype == dtype
    assert_within_rule(out, ref64, ref_lp, atol=1e-2, name=str(dtype))


def test_detection_is_specific():
    model = MoCEIR(dim=8, num_blocks=[1, 1, 1, 1])
    sd = model.state_dict()
    assert moce_spandrel.detect(sd) and moce_spandrel.detect({f"net.{k}": v for k, v in sd.items()})
    assert not moce_spandrel.detect({k: v for k, v in sd.items() if "adapter" not in k})  # no MoCE layers
    restormer_like = {"patch_embed.proj.weight": torch.zeros(8, 3, 3, 3), "output.weight": torch.zeros(3, 8, 3, 3)}
    assert not moce_spandrel.detect(restormer_like)
    assert not moce_spandrel.detect({"a": 1, "b": "text"})
    with pytest.raises(spandrel.UnsupportedModelError):
        spandrel.ModelLoader().load_from_state_dict({"conv.weight": torch.zeros(4, 3, 3, 3)})


def test_mismatched_tensors_are_a_clear_error(tmp_path):
    model = MoCEIR(dim=8, num_blocks=[1, 1, 1, 1])
    path = _write(model, tmp_path, "safetensors")
    sd = dict(model.state_dict())
    sd["output.weight"] = torch.zeros(3, 8, 5, 5)
    from moce_kernels.model.checkpoint import save_safetensors
    save_safetensors(sd, path, model.config)
    with pytest.raises(CheckpointError, match="output.weight"):
        spandrel.ModelLoader().load_from_file(path)


def test_install_twice():
    with pytest.raises(spandrel.DuplicateArchitectureError):
        moce_spandrel.install()
    assert moce_spandrel.install(ignore_duplicates=True) == []


def test_comfyui_node_folder_installs_and_loads_as_comfyui_does(tmp_path):
    """The custom-node folder's __init__ registers the architecture and defines no nodes; ComfyUI's
    upscale-model loader reads a .ckpt with torch.load(weights_only=True), takes its state_dict and
    calls ModelLoader().load_from_state_dict."""
    init = os.path.join(ROOT, "comfyui", "moce_kernels_spandrel", "__init__.py")
    spec = importlib.util.spec_from_file_location("moce_kernels_spandrel", init)
    node = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(node)
    assert node.NODE_CLASS_MAPPINGS == {} and node.NODE_DISPLAY_NAME_MAPPINGS == {}
    assert moce_spandrel.ARCH_ID in spandrel.MAIN_REGISTRY
    model = MoCEIR.from_preset("MoCE_IR_S").eval()
    sd = torch.load(_write(model, tmp_path, "ckpt"), map_location="cpu", weights_only=True)["state_dict"]
    desc = _load_state_dict(sd)
    assert "MoCE_IR_S" in desc.tags
    _check_descriptor(desc, model, torch.rand(1, 3, 8, 12))


def _load_state_dict(sd):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AssumedConfigWarning)
        return spandrel.ModelLoader().load_from_state_dict(sd).eval()
