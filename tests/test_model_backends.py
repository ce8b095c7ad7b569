"""The whole model under every fast backend against the reference data and the float64 reference.

Without a GPU the cuda backend (CUDA emulation) runs the smallest case of every file plus the
batched-eval and training-step checks, and the triton backend (interpreter) the smallest case of the
top-1 file (the top-2 file alone took 200 s there; top-2 routing is covered op by op in
test_experts_backends.py and test_routing_backends.py). With a GPU every backend runs everything, in
fp32, bf16 and fp16 against the float64 model (DESIGN.md's error rule).
"""
import pytest
import torch

import moce_kernels
from moce_kernels.testing import assert_within_rule, max_err

from _models import FILES, load_data, model_for

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
FAST = [b for b in moce_kernels.available_backends() if b != "reference"]
# Backends cheap enough for whole-model batched and training checks: all on a GPU; without one, the
# CUDA emulation (the Triton interpreter would take many minutes).
WHOLE_MODEL = FAST if GPU else [b for b in FAST if b == "cuda" and moce_kernels.backends.cuda_emulated()]


@pytest.fixture(autouse=True)
def _no_tf32():
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


# (backend, file) pairs of the reference-data check: all on a GPU; without one, the interpreter
# runs only the top-1 file.
DATA_CASES = [(b, f) for b in FAST for f in FILES if GPU or b != "triton" or f == FILES[0]]


@pytest.mark.skipif(not FAST, reason="no fast backend available")
@pytest.mark.parametrize("name,file", DATA_CASES)
def test_reference_data_under_backend(reference_dir, name, file):
    data = load_data(reference_dir, file)
    device = "cuda" if GPU else "cpu"
    model = model_for(data).to(device)
    cases = data["eval"] if GPU else [min(data["eval"], key=lambda c: c["input"].numel())]
    with moce_kernels.backend(name), torch.no_grad():
        for case in cases:
            out = model(case["input"].to(device)).cpu()
            err = max_err(out, case["output"])
            assert err <= 1e-4, f"{name}: max error {err:.2e} on {tuple(case['input'].shape)}"


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["reference"] + FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_model_within_rule(reference_dir, name, dtype):
    data = load_data(reference_dir, FILES[1])
    m64 = model_for(data).cuda().double()
    m_lp = model_for(data).cuda().to(dtype)
    x = torch.rand(3, 3, 40, 56, device="cuda")
    with torch.no_grad():
        ref64 = m64(x.double())
        with moce_kernels.backend("reference"):
            ref_lp = m_lp(x.to(dtype))
        with moce_kernels.backend(name):
            out = m_lp(x.to(dtype))
    atol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_within_rule(out, ref64, ref_lp, atol=atol, name=f"{name} {dtype}")


@pytest.mark.skipif(not WHOLE_MODEL, reason="no backend cheap enough for whole-model checks here")
@pytest.mark.parametrize("name", WHOLE_MODEL)
def test_batched_eval_per_image_under_backend(reference_dir, name):
    data = load_data(reference_dir, FILES[0])
    model = model_for(data).to(DEV)
    x = torch.randn(4, 3, 32, 40, device=DEV) * torch.linspace(0.2, 3, 4, device=DEV).view(4, 1, 1, 1)
    with moce_kernels.backend(name), torch.no_grad():
        batched = model(x)
        for b in range(4):
            assert max_err(batched[b:b + 1], model(x[b:b + 1])) <= 1e-4


@pytest.mark.skipif(not WHOLE_MODEL, reason="no backend cheap enough for whole-model checks here")
@pytest.mark.parametrize("name", WHOLE_MODEL)
def test_training_step_under_backend(reference_dir, name):
    data = load_data(reference_dir, FILES[1])
    ref = model_for(data, routing_noise="never").to(DEV).train()
    fast = model_for(data, routing_noise="never").to(DEV).train()
    t = data["train"]
    x = t["input"].to(DEV)
    with moce_kernels.backend("reference"):
        out_r = ref(x)
        (out_r.square().mean() + ref.total_loss).backward()
    with moce_kernels.backend(name):
        out_f = fast(x)
        (out_f.square().mean() + fast.total_loss).backward()
    assert max_err(out_f.detach().cpu(), t["output"]) <= 1e-4
    assert abs(fast.total_loss.item() - t["aux_loss"].item()) <= 1e-4
    for (n, p), q in zip(ref.named_parameters(), fast.parameters()):
        assert (p.grad is None) == (q.grad is None), f"{n}: grad None on one backend only (an unused expert's)"
        if p.grad is None:
            continue
        scale = p.grad.abs().max().item() + 1e-6
        assert max_err(q.grad, p.grad) <= 1e-3 * scale + 1e-5, n
