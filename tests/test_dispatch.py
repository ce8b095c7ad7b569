"""Op declarations and dispatch: one declaration per op, memoized choices, the chooser hook, settings,
autocast, and the input refusals of issue 23 item 5."""
import cProfile
import pstats

import pytest
import torch

import moce_kernels
from moce_kernels import backends, census, nvtx, ops, settings
from moce_kernels.model import MoCEIR

PUBLIC = ("window_fft_attention", "pointwise_depthwise_conv", "pointwise_depthwise_conv_gated", "moe_route",
          "moe_dispatch", "moe_experts", "moe_combine", "channel_attention", "layer_norm_pointwise_depthwise_conv",
          "layer_norm_pointwise_depthwise_conv_gated", "layer_norm_pointwise_conv", "pointwise_conv")


def test_every_op_is_declared_once_and_enumerated_from_the_declarations():
    names = [d.name for d in ops.declarations()]
    assert sorted(names) == sorted(PUBLIC) and len(set(names)) == len(names)
    for d in ops.declarations():
        assert d.op is getattr(torch.ops.moce, d.name).default
        assert d.dispatch is backends.op_dispatch(d.name)
        assert census.family_of(f"moce::{d.name}", None) == d.family != "other"
        assert d.lowering is None or callable(d.lowering)
        assert [b for b, _, _ in d.implementations][-1:] != [] and "reference" in [b for b, _, _ in d.implementations]
    assert set(census.OP_FAMILIES) == {d.name for d in ops.declarations(backward=True)}
    assert ops.declaration("window_fft_attention").backward.name == "window_fft_attention_backward"


def test_lowering_field_can_be_attached_and_looked_up():
    decl = ops.declaration("pointwise_conv")
    old = decl.lowering
    try:
        decl.lowering = lambda x, w, b, r: torch.nn.functional.conv2d(x, w, b) + (0 if r is None else r)
        assert ops.declaration("pointwise_conv").lowering is decl.lowering
    finally:
        decl.lowering = old


def test_explain_names_why_each_implementation_can_or_cannot_run():
    q = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    w, b = torch.ones(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    text = ops.explain("window_fft_attention", q, q, q, 64, w, b, 1e-5)
    assert "reference: can run" in text and "runs: reference" in text
    if "triton" in moce_kernels.available_backends():
        assert "backend 'triton' does not take torch.float64" in text
    if "cuda" in moce_kernels.available_backends():
        with moce_kernels.backend("cuda"):
            text = ops.explain("window_fft_attention", q.float(), q.float(), q.float(), 64, w.float(), b.float(), 1e-5)
        assert "window_size 64" in text and "runs: reference" in text


def test_debug_checks_print_the_reasons_once_per_key(capsys):
    previous = settings.update(debug_checks=True)
    try:
        idx = torch.randint(0, 3, (4, 1))
        with moce_kernels.backend("reference"):
            ops.moe_dispatch(idx, 3)
            ops.moe_dispatch(idx, 3)
    finally:
        settings.update(debug_checks=previous.debug_checks)
    out = capsys.readouterr().out
    assert out.count("moe_dispatch on cpu") <= 1  # printed at the memo miss only (none if memoized before)


def _model_forward_profile(model, x):
    with torch.no_grad():
        model(x)
        pr = cProfile.Profile()
        pr.enable()
        model(x)
        pr.disable()
    return pstats.Stats(pr).stats


def test_a_forward_after_the_first_resolves_nothing():
    """After the first forward, no op call imports, reads the environment, asks for CUDA or resolves."""
    model = MoCEIR.from_preset("MoCE_IR").eval()
    stats = _model_forward_profile(model, torch.rand(1, 3, 16, 16))
    frames = [(f, fn) for (f, _, fn) in stats
              if "importlib" in f or f.endswith("os.py") or f == "<frozen os>"
              or fn in ("is_available", "_choose", "resolve", "get_backend", "_why_unavailable")]
    assert not frames, frames


def test_memoized_choice_follows_set_backend_and_settings():
    idx = torch.randint(0, 3, (4, 1))
    table = backends.op_dispatch("moe_dispatch")
    with moce_kernels.backend("reference"):
        ops.moe_dispatch(idx, 3)
    assert table.names[("reference", "cpu", torch.int64)] == "reference"
    settings.update()  # any change drops the memo
    assert not table.memo


def test_chooser_hook_gets_thunks_of_the_eligible_implementations(monkeypatch):
    """The CPU treated as tunable: ``auto`` asks the chooser once per key, with thunks that run each
    candidate on the call's inputs, and reuses its answer."""
    fast = [b for b in ("triton", "cuda") if b in moce_kernels.available_backends()]
    if not fast:
        pytest.skip("needs a kernel backend (interpreter or emulation) beside the reference")
    monkeypatch.setattr(backends, "TUNABLE_DEVICES", frozenset({"cpu", "cuda"}))
    asked = []

    def chooser(op, key, candidates):
        asked.append((op, key, [n for n, _ in candidates]))
        results = {n: thunk() for n, thunk in candidates}
        torch.testing.assert_close(results["reference"][2], results[candidates[0][0]][2])
        return "reference"

    backends.set_chooser(chooser)
    try:
        idx = torch.randint(0, 4, (6, 1))
        with moce_kernels.backend("auto"):
            for _ in range(3):
                ops.moe_dispatch(idx, 4)
    finally:
        backends.set_chooser(None)
    assert len(asked) == 1
    op, key, names = asked[0]
    assert op == "moe_dispatch" and key[:3] == ("auto", "cpu", torch.int64) and key[3] == (6, 1)
    assert names[-1] == "reference" and set(fast) <= set(names)


def test_settings_update_rejects_unknown_knobs():
    with pytest.raises(ValueError, match="unknown setting"):
        settings.update(no_such_knob=1)


# ---------------------------------------------------------------- issue 23, item 5
def _experts_inputs(device="cpu", weights_device="cpu", B=2):
    from moce_kernels.expert_stage.weights import ExpertWeights
    C, r = 4, 2
    shapes = ExpertWeights.shapes(C, r, 3, 3)
    w = ExpertWeights(*[torch.randn(s, device=weights_device) for s in shapes])
    x = torch.randn(B, C, 8, 8, device=device)
    perm = torch.arange(B)
    offsets = torch.tensor([0, B])
    return x, torch.randn(B, C, 8, 8), perm, offsets, 1, [w], [4], [1]


def test_moe_experts_refuses_weights_on_another_device():
    args = list(_experts_inputs(weights_device="meta"))
    with pytest.raises(ValueError, match="expert 0 weight proj0 is on meta"):
        ops.moe_experts(*args)
    args = list(_experts_inputs())
    args[1] = args[1].to("meta")
    with pytest.raises(ValueError, match="shared is on device meta"):
        ops.moe_experts(*args)


def test_moe_experts_and_route_refuse_an_empty_batch():
    x, shared, _, _, k, w, win, dep = _experts_inputs(B=2)
    with pytest.raises(ValueError, match="B >= 1"):
        ops.moe_experts(x[:0], shared[:0], torch.zeros(0, dtype=torch.int64), torch.tensor([0, 0]), k, w, win, dep)
    E, C, F = 3, 4, 5
    args = (torch.randn(0, C, 8, 8), torch.randn(0, F), torch.randn(E, C), torch.randn(E, F), torch.rand(E),
            torch.zeros(0, E))
    with pytest.raises(ValueError, match="B >= 1"):
        ops.moe_route(*args, 1, 1.0, True)


def test_moe_route_refuses_a_fractional_k():
    E, C, F, B = 3, 4, 5, 2
    args = (torch.randn(B, C, 8, 8), torch.randn(B, F), torch.randn(E, C), torch.randn(E, F), torch.rand(E),
            torch.zeros(B, E))
    with pytest.raises(ValueError, match="k must be in .* \\(an integer\\), got 2.5"):
        ops.moe_route(*args, 2.5, 1.0, True)


def test_pointwise_conv_without_output_channels_is_a_clear_error():
    with pytest.raises(ValueError, match="no output channels"):
        ops.pointwise_conv(torch.randn(1, 4, 5, 5), torch.randn(0, 4, 1, 1))


# ---------------------------------------------------------------- issue 23, item 6
def _small_model():
    return MoCEIR.from_preset("MoCE_IR").eval()


def test_model_forward_under_cpu_autocast_bf16_matches_the_reference():
    """torch.autocast("cpu", bfloat16): the ops take autocast's dtype like the aten ops around them; the
    result is within the bf16 error of the float64 reference."""
    model = _small_model()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        want = model.double()(x.double())
        model.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x)
    err = (got.double() - want).abs().max().item()
    scale = want.abs().max().item()
    assert torch.isfinite(got).all() and err <= 0.05 * scale, (err, scale)


def test_ops_follow_autocast_dtype_also_called_through_torch_ops():
    """Every floating input (the residual too) takes autocast's dtype; float64 stays."""
    x, w, r = torch.randn(1, 4, 5, 5), torch.randn(3, 4, 1, 1), torch.randn(1, 3, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.pointwise_conv(x, w, None, r).dtype == torch.bfloat16
        assert torch.ops.moce.pointwise_conv(x, w, None, r).dtype == torch.bfloat16
        q = torch.randn(1, 2, 4, 4)
        assert ops.window_fft_attention(q, q, q, 4, torch.ones(2), torch.zeros(2)).dtype == torch.bfloat16
        assert ops.pointwise_conv(x.double(), w.double()).dtype == torch.float64


def test_scalar_checks_accept_symbolic_floats_under_dynamic_fullgraph_compile():
    x, w = torch.randn(1, 4, 6, 6), torch.randn(3, 4, 1, 1)
    nw, nb = torch.ones(4), torch.zeros(4)

    def f(x, eps):
        return ops.layer_norm_pointwise_conv(x, nw, nb, w, None, eps)

    torch._dynamo.reset()
    compiled = torch.compile(f, dynamic=True, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, 1e-5), f(x, 1e-5))
    torch.testing.assert_close(compiled(x, 1e-3), f(x, 1e-3))


def test_each_annotated_function_has_a_code_object_of_its_own():
    """Dynamo caches per code object: a shared wrapper collects one entry per decorated function (and
    hits the recompile limit under dynamic=True)."""
    @nvtx.annotate("a")
    def a(x):
        return x + 1

    @nvtx.annotate("b")
    def b(x):
        return x + 2

    assert a.__code__ is not b.__code__
    torch._dynamo.reset()
    fa, fb = torch.compile(a, dynamic=True, backend="eager"), torch.compile(b, dynamic=True, backend="eager")
    x = torch.randn(3)
    assert torch.equal(fa(x), x + 1) and torch.equal(fb(x), x + 2)


def test_readme_op_table_lists_every_declared_op():
    import pathlib
    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = text.split("\n## Ops\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    for d in ops.declarations():
        assert any(f"`{d.name}" in row for row in rows), f"README's op table lacks {d.name}"


def test_whole_model_compiles_with_dynamic_shapes_without_breaks_or_recompile_limit():
    """torch.compile(dynamic=True) of MoCE-IR: no graph break (math.isfinite in the scalar checks was one)
    and no frame left to eager mode at Dynamo's recompile limit (the shared nvtx wrapper was one)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = MoCEIR.from_preset("MoCE_IR").eval()
    compiled = torch.compile(model, dynamic=True, backend="eager")
    with torch.no_grad():
        for px in (16, 24):
            x = torch.rand(1, 3, px, px)
            torch.testing.assert_close(compiled(x), model(x))
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["frames"]["total"] == counters["frames"]["ok"] <= 4, dict(counters["frames"])


def test_auto_on_a_tunable_device_runs_what_the_tuner_measured_fastest(monkeypatch):
    """``auto``'s default chooser is the tuner (the CPU treated as tunable, an injected timer that makes the
    reference fastest): the first call of a shape times every eligible implementation once, later calls
    time nothing, and a shape first met during a graph capture is not memoized."""
    from moce_kernels import autotune
    fast = [b for b in ("triton", "cuda") if b in moce_kernels.available_backends()]
    if not fast:
        pytest.skip("needs a kernel backend (interpreter or emulation) beside the reference")
    monkeypatch.setattr(backends, "TUNABLE_DEVICES", frozenset({"cpu", "cuda"}))
    timed = []

    def timer(thunk):
        timed.append(thunk)
        thunk()
        return 1.0 if len(timed) % 2 == 0 else 2.0  # the second candidate timed (the reference) is faster

    monkeypatch.setattr(autotune, "DEFAULT", autotune.Tuner(timer=timer, persist=False))
    backends.set_chooser(None)  # the default: the tuner
    x, w, b = torch.randn(2, 8, 5, 7), torch.randn(4, 8, 1, 1), torch.randn(4)
    with moce_kernels.backend("auto"):
        y = ops.pointwise_conv(x, w, b)
        n = len(timed)
        ops.pointwise_conv(x, w, b)
    assert n >= 2 and len(timed) == n, "the second call of a shape timed again"
    (entry,) = autotune.DEFAULT.table()["entries"]
    assert entry["op"] == "pointwise_conv" and entry["choice"] == "reference"
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x, w, b))
    with monkeypatch.context() as capture:  # a new shape first met while a CUDA graph is captured
        capture.setattr(backends, "_capturing", lambda device: True)
        capture.setattr(autotune, "capturing", lambda: True)
        with moce_kernels.backend("auto"):
            for _ in range(2):
                ops.pointwise_conv(x[:1], w, b)
    assert len(timed) == n and len(autotune.DEFAULT.table()["entries"]) == 1, "timed or recorded in a capture"
    with moce_kernels.backend("auto"):
        ops.pointwise_conv(x[:1], w, b)
    assert len(timed) > n and len(autotune.DEFAULT.table()["entries"]) == 2, "the capture's untimed choice was kept"
    backends.clear_choices()
