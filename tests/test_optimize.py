"""moce_kernels.optimize: the compiled inference path computes what the eager model computes (CPU:
Inductor with our ops opaque; CUDA graphs are GPU-only), bounds its compiled shapes, refuses training."""
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
