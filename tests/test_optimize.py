"""moce_kernels.optimize: the compiled inference path computes what the eager model computes (CPU:
Inductor with our ops opaque; CUDA graphs are GPU-only), bounds its compiled shapes, refuses training."""
import threading
import warnings

import pytest
import torch

import moce_kernels
from moce_kernels import MoCEIR
from moce_kernels.testing import assert_within_rule


def _tiny() -> MoCEIR:
    torch.manual_seed(0)
    return MoCEIR(dim=8, levels=2, heads=[1, 2], num_blocks=[1, 1], num_dec_blocks=[1], stage_depth=[1],
                  rank_type="spread", depth_type="constant", topk=2).eval()


def test_optimize_matches_eager_within_the_error_rule():
    model = _tiny()
    fast = moce_kernels.optimize(model, max_shapes=2)
    model64 = _tiny().double()
    for shape in ((2, 3, 24, 20), (1, 3, 17, 9)):  # batch > 1, and a size the model pads
        x = torch.rand(shape)
        with torch.no_grad():
            eager, ref64 = model(x), model64(x.double())
        out = fast(x)
        assert out.shape == x.shape and not out.requires_grad
        assert_within_rule(out, ref64, eager, atol=1e-5, name=f"optimize {shape}")
    x3 = torch.rand(1, 3, 8, 8)
    with pytest.warns(UserWarning, match="2 input shapes are compiled already"):
        out = fast(x3)  # a third shape runs the eager model
    with torch.no_grad():
        assert torch.equal(out, model(x3))


def test_optimize_refuses_training_and_bad_input():
    model = _tiny()
    fast = moce_kernels.optimize(model)
    with pytest.raises(ValueError, match="3 input channels"):
        fast(torch.rand(1, 4, 8, 8))
    model.train()
    with pytest.raises(RuntimeError, match="for inference"):
        fast(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="max_shapes"):
        moce_kernels.optimize(model, max_shapes=0)


def test_optimize_reports_the_models_mode_and_returns_ordinary_tensors():
    """The wrapper's ``training`` is the model's (restore() does not warn about training mode for an eval
    model), and its outputs can be modified in place, as its docstring says."""
    model = _tiny()
    fast = moce_kernels.optimize(model, compile=False)
    assert not fast.training
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out = moce_kernels.restore(fast, torch.rand(1, 3, 16, 16))
    with torch.no_grad():
        y = fast(torch.rand(1, 3, 16, 16))
    assert not y.is_inference()
    y.clamp_(0, 1)
    out.clamp_(0, 1)
    assert y.min() >= 0 and y.max() <= 1
    fast.train()
    assert model.training and fast.training
    fast.eval()
    assert not model.training
    model.train()
    assert fast.training


def test_optimize_knows_when_the_calling_thread_fixes_routes():
    """CUDA graphs are skipped exactly inside this thread's record_routes / fixed_routes blocks."""
    model = _tiny()
    fast = moce_kernels.optimize(model, compile=False)
    assert not fast.routes_overridden()
    seen = []
    with torch.no_grad(), model.record_routes():
        assert fast.routes_overridden()
        t = threading.Thread(target=lambda: seen.append(fast.routes_overridden()))
        t.start()
        t.join(60)
    assert seen == [False] and not fast.routes_overridden()
    other = moce_kernels.optimize(_tiny(), compile=False)
    with model.record_routes():
        assert not other.routes_overridden(), "a block on another model"


@pytest.mark.gpu
def test_gpu_restore_through_optimize_matches_the_eager_model():
    """Tiles with fixed routes through the graphed model give what the eager model gives (a graph would
    replay the routes it was captured with)."""
    model = _tiny().cuda()
    fast = moce_kernels.optimize(model)
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        image = torch.rand(1, 3, 64, 96, generator=g).cuda() * (0.2 + 0.6 * seed)
        want = moce_kernels.restore(model, image, tile=32, overlap=8)
        got = moce_kernels.restore(fast, image, tile=32, overlap=8)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_optimize_graphs_match_eager(dtype):
    """On a GPU: compiled and replayed as a CUDA graph per shape, within the error rule of the eager model;
    the graphs' outputs are copies (a later call does not change an earlier result)."""
    model = MoCEIR.from_preset("MoCE_IR_S").eval().cuda()
    model64 = MoCEIR.from_preset("MoCE_IR_S").eval().cuda().double()
    model64.load_state_dict(model.state_dict())
    model = model.to(dtype)
    fast = moce_kernels.optimize(model)
    x = torch.rand(2, 3, 96, 80, device="cuda")
    with torch.no_grad():
        eager, ref64 = model(x.to(dtype)), model64(x.double())
    out = fast(x.to(dtype))
    kept = out.clone()
    fast(torch.rand_like(x).to(dtype))
    assert torch.equal(out, kept)
    assert_within_rule(out, ref64, eager, atol=1e-4 if dtype == torch.float32 else 3e-2, name=f"optimize {dtype}")
