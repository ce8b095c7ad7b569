"""The expert stage's per-layer plan (packed weights and meta tables built once, re-packed when a
weight changes) and the device tables a captured CUDA graph reads (kept while it may replay).

Without a GPU, a capture is simulated: ``torch.cuda.is_current_stream_capturing`` patched to True
and "cuda" tables built on the CPU (only their lifetime is under test)."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

import moce_kernels
from moce_kernels import MoCEIR, ops
from moce_kernels.expert_stage import driver, plan, tables
from moce_kernels.expert_stage.weights import ExpertWeights
from moce_kernels.model.blocks import ConcatCache
from moce_kernels.reference import routing as ref_routing

CUDA = torch.device("cuda")


@pytest.fixture
def fake_cuda_tables(monkeypatch):
    """"cuda" tables built on the CPU; returns a switch for the simulated capture."""
    state = {"capturing": False}
    real_tensor = torch.tensor

    def tensor(data, *args, device=None, **kwargs):
        return real_tensor(data, *args, **kwargs)

    monkeypatch.setattr(torch, "tensor", tensor)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state["capturing"])
    return state


def test_table_read_by_a_captured_graph_outlives_cache_eviction(fake_cuda_tables):
    """A table used during a capture must stay allocated however many other tables are built
    afterwards (the graph replays its address)."""
    fake_cuda_tables["capturing"] = True
    rows = [[7, 1234567, 3]]
    t = driver.device_table(rows, CUDA)
    fake_cuda_tables["capturing"] = False
    ref = weakref.ref(t)
    del t
    for i in range(4200):  # more than any capacity of the process-wide cache
        driver.device_table([[i, -1]], CUDA)
    gc.collect()
    assert ref() is not None, "a table a captured graph reads was freed"
    assert driver.device_table(rows, CUDA) is ref()


def test_table_cache_bounded_outside_captures():
    cache = tables.TableCache(capacity=3)
    cpu = torch.device("cpu")
    first = cache.get("a", lambda: [[1]], cpu)
    assert cache.get("a", lambda: [[2]], cpu) is first  # built once per key
    for key in "bcde":
        cache.get(key, lambda: [[0]], cpu)
    assert len(cache) == 3 and cache.pinned() == 0
    assert cache.get("a", lambda: [[9]], cpu).tolist() == [[9]]  # evicted, rebuilt


def _experts(C=4, ranks=(1, 2), dtype=torch.float32):
    ws = []
    for r in ranks:
        ws.append(ExpertWeights(*(torch.randn(s, dtype=torch.float64).to(dtype)
                                  for s in ExpertWeights.shapes(C, r, 3, 7))))
    return ws


def _fresh_pack(ws, C, dtype):
    wl = plan.weight_layout(C, ws)
    return plan.pack_weights(wl, ws, dtype, torch.empty(max(wl.w_total, 1), dtype=dtype))


def test_plan_reused_and_repacked_in_place_on_a_version_change():
    ws, C = _experts(), 4
    p = plan.plan_for(ws, [4, 8], [1, 1], C, torch.float32, torch.device("cpu"))
    wp = p.wp
    assert plan.plan_for(ws, [4, 8], [1, 1], C, torch.float32, torch.device("cpu")) is p
    with torch.no_grad():
        ws[1].kv.mul_(2.0)  # in place: the version moves, the tensor stays
    p2 = plan.plan_for(ws, [4, 8], [1, 1], C, torch.float32, torch.device("cpu"))
    assert p2 is p and p2.wp is wp, "an in-place change must re-pack into the same buffer"
    torch.testing.assert_close(p.wp, _fresh_pack(ws, C, torch.float32), rtol=0, atol=0)
    # a new tensor, another dtype, another depth: another plan
    ws2 = [ws[0]._replace(proj2=ws[0].proj2.clone()), ws[1]]
    assert plan.plan_for(ws2, [4, 8], [1, 1], C, torch.float32, torch.device("cpu")) is not p
    w64 = [w.map(torch.Tensor.double) for w in ws]
    assert plan.plan_for(w64, [4, 8], [1, 1], C, torch.float64, torch.device("cpu")).wp.dtype == torch.float64
    assert plan.plan_for(ws, [4, 8], [1, 2], C, torch.float32, torch.device("cpu")) is not p


def test_plan_repacks_on_every_call_while_capturing(monkeypatch):
    """A captured graph must contain the packing, so that replays see weights loaded in place (even
    through ``.data``, which no version records)."""
    ws, C = _experts(), 4
    p = plan.plan_for(ws, [4, 8], [1, 1], C, torch.float32, torch.device("cpu"))
    ws[0].proj0.data.add_(1.0)  # no version bump: an eager call keeps the packed buffer
    plan.plan_for(ws, [4, 8], [1, 1], C, torch.float32, torch.device("cpu"))
    assert not torch.equal(p.wp, _fresh_pack(ws, C, torch.float32))
    monkeypatch.setattr(plan, "capturing", lambda device: True)
    assert plan.plan_for(ws, [4, 8], [1, 1], C, torch.float32, torch.device("cpu")) is p
    torch.testing.assert_close(p.wp, _fresh_pack(ws, C, torch.float32), rtol=0, atol=0)
    assert p.captured


def test_plan_freed_with_its_weights_unless_captured(monkeypatch):
    ws, C = _experts(), 4
    ref = weakref.ref(plan.plan_for(ws, [4, 8], [1, 1], C, torch.float32, torch.device("cpu")))
    del ws
    gc.collect()
    assert ref() is None, "a plan must not outlive its layer's weights"
    ws = _experts()
    monkeypatch.setattr(plan, "capturing", lambda device: True)
    ref = weakref.ref(plan.plan_for(ws, [4, 8], [1, 1], C, torch.float32, torch.device("cpu")))
    del ws
    gc.collect()
    assert ref() is not None, "a plan a captured graph reads must outlive its weights"
    plan._RETIRED.remove(ref())


@pytest.mark.parametrize("backend", [b for b in moce_kernels.available_backends() if b != "reference"])
def test_experts_op_sees_in_place_weight_updates(backend):
    """Two calls with the same weight tensors, updated in place between them: each call computes with
    the weights it is given (the plan re-packs), as the reference does."""
    C, ranks, windows, depths = 4, (1, 2), [4, 8], [1, 1]
    ws = _experts(C, ranks)
    idx = torch.tensor([[0], [1]])
    _, offsets, perm = ref_routing.dispatch(idx, 2)
    x, sh = torch.randn(2, C, 5, 6), torch.randn(2, C, 5, 6)
    for _ in range(2):
        with moce_kernels.backend(backend), torch.no_grad():
            out = ops.moe_experts(x, sh, perm, offsets, 1, ws, windows, depths)
        with moce_kernels.backend("reference"), torch.no_grad():
            want = ops.moe_experts(x, sh, perm, offsets, 1, ws, windows, depths)
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            for w in ws:
                w.proj2.mul_(-3.0)
                w.q.add_(0.5)


def test_concat_cache_reuses_until_a_parameter_changes():
    a, b = torch.nn.Parameter(torch.randn(2, 3)), torch.nn.Parameter(torch.randn(1, 3))
    cat = ConcatCache()
    with torch.no_grad():
        first = cat((a, b))
        assert cat((a, b)) is first
        a.add_(1.0)
        second = cat((a, b))
    assert second is not first
    torch.testing.assert_close(second, torch.cat([a, b]), rtol=0, atol=0)
    with torch.enable_grad():  # recording: built per call, in the autograd graph
        out = cat((a, b))
        assert out.requires_grad and out is not second


def test_decoder_block_projection_weights_concatenated_once():
    model = MoCEIR.from_preset("MoCE_IR_S").eval()
    x = torch.rand(1, 3, 16, 16)
    calls = []
    real_cat = torch.cat

    def counting_cat(tensors, *args, **kwargs):
        calls.append(tuple(t.shape for t in tensors))
        return real_cat(tensors, *args, **kwargs)

    with torch.no_grad():
        model(x)
        torch.cat = counting_cat
        try:
            model(x)
        finally:
            torch.cat = real_cat
    blocks = [m for m in model.modules() if type(m).__name__ == "DecoderBlock"]
    assert blocks
    proj = {(t.shape, t.shape) for m in blocks for t in (m.proj[0].weight, m.proj[0].bias)}
    assert not [c for c in calls if c in proj], "DecoderBlock concatenated its projection weights again"
