"""Sync-freedom of the MoCE-IR forward: ``torch.compile(fullgraph=True)`` traces the whole model (no
graph break, so no host read of routing data) and matches eager, in eval and in training; on a GPU the
whole eval forward is captured in one CUDA graph and replayed on inputs that route differently.

CPU compile is slow on small machines, so the CPU cases keep graphs small: the whole tiny top-2 model
through Dynamo only (``backend="eager"``: a graph break would fail), a two-level model through AOT
autograd in training (``aot_eager``: fake impls + autograd formulas), and one MoCE layer through
Inductor. The GPU cases compile the whole tiny model with Inductor."""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Tuple

import pytest
import torch

import moce_kernels
from moce_kernels import MoCEIR, backends
from moce_kernels.model.moe import AdapterLayer

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FAST = [b for b in moce_kernels.available_backends() if b != "reference"]


def _tiny_top2(reference_dir: str) -> MoCEIR:
    data = torch.load(os.path.join(reference_dir, "official_tiny_top2.pt"))
    model = MoCEIR(**data["config"], routing_noise="never")
    model.load_state_dict(data["state_dict"])
    return model


def _two_level(top_k: int = 2) -> MoCEIR:
    torch.manual_seed(0)
    return MoCEIR(dim=8, levels=2, heads=[1, 1], num_blocks=[1, 1], num_dec_blocks=[1], num_refinement_blocks=1,
                  rank_type="spread", depth_type="constant", stage_depth=[1], topk=top_k, with_complexity=True,
                  routing_noise="never")


def _grads(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(compiled: Dict[str, torch.Tensor], eager: Dict[str, torch.Tensor]) -> None:
    """Eager leaves the experts that got no image with grad None (as the authors' model does); a compiled
    graph gives them zeros (model/moe.py, ExpertUsage). Every other gradient matches."""
    assert set(eager) <= set(compiled)
    for n in set(compiled) - set(eager):
        assert n.startswith("experts.") or ".experts." in n, f"{n}: only an unused expert may lack an eager grad"
        assert not compiled[n].any(), f"{n}: an unused expert's compiled gradient must be zeros"
    for n in eager:
        torch.testing.assert_close(compiled[n], eager[n], rtol=1e-4, atol=1e-5, msg=n)


# ----------------------------------------------------------------------------- CPU (reference backend)
def test_fullgraph_eval_whole_model(reference_dir):
    torch._dynamo.reset()
    model = _tiny_top2(reference_dir).eval()
    x = torch.randn(2, 3, 16, 24)
    with moce_kernels.backend("reference"), torch.no_grad():
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        got = compiled(x)
        want = model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fullgraph_train_aot_autograd():
    torch._dynamo.reset()
    model = _two_level().train()
    x = torch.randn(2, 3, 16, 16)
    with moce_kernels.backend("reference"):
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out = compiled(x)
        (out.square().mean() + model.total_loss).backward()
        got_out, got_loss, got_grads = out.detach(), model.total_loss.detach(), _grads(model)
        model.zero_grad(set_to_none=True)
        out = model(x)
        (out.square().mean() + model.total_loss).backward()
    torch.testing.assert_close(got_out, out.detach(), rtol=1e-5, atol=1e-5)
    assert got_loss.item() > 0
    torch.testing.assert_close(got_loss, model.total_loss.detach(), rtol=1e-5, atol=1e-6)
    want = _grads(model)
    _assert_same_grads(got_grads, want)
    assert any("routing" in n for n in want), "the aux loss should reach the router weights"


def test_inductor_moce_layer_eval_and_train():
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = AdapterLayer(8, 2, top_k=2, rank_type="spread", depth_type="constant", freq_dim=16,
                         with_complexity=True, complexity_scale="max", routing_noise="never")
    x, fe, sh = torch.randn(3, 8, 8, 8), torch.randn(3, 16), torch.randn(3, 8, 8, 8)
    compiled = torch.compile(layer, fullgraph=True)
    with moce_kernels.backend("reference"):
        layer.eval()
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, fe, sh), layer(x, fe, sh), rtol=1e-5, atol=1e-5)
        layer.train()
        out = compiled(x, fe, sh)
        (out.sum() + layer.loss).backward()
        got_loss, got_grads = layer.loss.detach(), _grads(layer)
        layer.zero_grad(set_to_none=True)
        (layer(x, fe, sh).sum() + layer.loss).backward()
    torch.testing.assert_close(got_loss, layer.loss.detach(), rtol=1e-5, atol=1e-6)
    _assert_same_grads(got_grads, _grads(layer))


# ----------------------------------------------------------------------------- GPU
MODEL_OPS = tuple(d.name for d in moce_kernels.ops.declarations())  # every op, the fused trunk ops included


def _needs_all_ops(name: str) -> None:
    """Skip unless an explicit backend ``name`` implements every op of the model."""
    if name != "auto":
        for op in MODEL_OPS:
            try:
                backends.implementation(op, name)
            except NotImplementedError:
                pytest.skip(f"backend {name!r} has no {op}")


def _needs_sync_free(name: str) -> None:
    """Skip unless backend ``name`` implements every op of the model and runs the expert stage on the
    device (the reference expert stage reads ``offsets`` on the host)."""
    _needs_all_ops(name)
    chosen = backends.resolve("moe_experts", DEVICE, name)
    if chosen == "reference":
        pytest.skip(f"backend {name!r} runs moe_experts on the reference (host-synchronising); "
                    "a triton/cuda moe_experts is needed for CUDA-graph capture")


def _eager_routes(model: MoCEIR, x: torch.Tensor) -> Tuple[Tuple[int, ...], ...]:
    """Expert indices chosen at every MoCE layer (eager run), as a hashable signature."""
    seen: List[torch.Tensor] = []
    layers = model.adapters()
    originals: List[Callable] = []
    for layer in layers:
        orig = layer.route
        originals.append(orig)

        def rec(x_, f_, _orig=orig):
            out = _orig(x_, f_)
            seen.append(out[1].detach().clone())
            return out
        layer.route = rec
    try:
        with torch.no_grad():
            model(x)
    finally:
        for layer in layers:
            del layer.route
    return tuple(tuple(t.flatten().tolist()) for t in seen)


def _inputs_that_route_differently(model: MoCEIR, shape, n: int) -> List[torch.Tensor]:
    """n inputs whose routes (eager) are pairwise different, drawn from varied image statistics."""
    picked, sigs = [], set()
    B, C, H, W = shape
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, H, device=DEVICE), torch.linspace(-1, 1, W, device=DEVICE),
                            indexing="ij")
    for trial in range(200):
        kind = trial % 4
        x = torch.randn(shape, device=DEVICE) * (0.05 + 0.5 * torch.rand(B, 1, 1, 1, device=DEVICE))
        if kind == 1:
            x = x + torch.sin(8 * xx * (trial + 1) / 10) * torch.cos(5 * yy)
        elif kind == 2:
            x = x + 2 * torch.rand(B, C, 1, 1, device=DEVICE) - 1
        elif kind == 3:
            x = x * 4
        sig = _eager_routes(model, x)
        if sig not in sigs:
            sigs.add(sig)
            picked.append(x)
            if len(picked) == n:
                return picked
    pytest.skip(f"found only {len(picked)} differently-routed inputs")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto"] + FAST)
def test_cuda_graph_whole_forward(reference_dir, backend):
    with moce_kernels.backend(backend):
        _needs_sync_free(backend)
        model = _tiny_top2(reference_dir).eval().to(DEVICE)
        shape = (2, 3, 40, 48)
        inputs = _inputs_that_route_differently(model, shape, 3)
        static_x = inputs[0].clone()
        with torch.no_grad():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    model(static_x)  # warm-up: Triton JIT, cuBLAS/cuDNN handles, allocator
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = model(static_x)
            for x in inputs + inputs[::-1]:
                static_x.copy_(x)
                graph.replay()
                torch.cuda.synchronize()
                want = model(x)
                torch.testing.assert_close(static_out, want, rtol=1e-4, atol=1e-4)


SLOW_CPU = os.environ.get("MOCE_SLOW_COMPILE", "0") not in ("", "0")


@pytest.mark.skipif(DEVICE.type == "cpu" and not SLOW_CPU,
                    reason="Inductor on the whole model takes minutes on a small CPU; set MOCE_SLOW_COMPILE=1")
@pytest.mark.parametrize("backend", ["auto"] + FAST if DEVICE.type == "cuda" else ["reference"])
def test_inductor_whole_model(reference_dir, backend):
    """Inductor (default torch.compile backend), fullgraph, whole tiny top-2 model: eval and training."""
    torch._dynamo.reset()
    with moce_kernels.backend(backend):
        _needs_all_ops(backend)
        model = _tiny_top2(reference_dir).to(DEVICE)
        x = torch.randn(2, 3, 40, 48, device=DEVICE)
        compiled = torch.compile(model, fullgraph=True)
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
        model.train()
        out = compiled(x)
        (out.square().mean() + model.total_loss).backward()
        got_loss, got_grads = model.total_loss.detach(), _grads(model)
        model.zero_grad(set_to_none=True)
        out = model(x)
        (out.square().mean() + model.total_loss).backward()
        torch.testing.assert_close(got_loss, model.total_loss.detach(), rtol=1e-4, atol=1e-5)
        want = _grads(model)
        for n in want:
            torch.testing.assert_close(got_grads[n], want[n], rtol=1e-3, atol=1e-4, msg=n)
