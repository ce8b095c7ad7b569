"""Backend selection API: set_backend, the context manager, MOCE_BACKEND, clear errors."""
import contextlib
import os
import threading

import pytest
import torch

import moce_kernels
from moce_kernels import backends, settings


def test_available_and_default():
    assert "reference" in moce_kernels.available_backends()
    assert moce_kernels.get_backend() in ("auto",) + backends.BACKENDS


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        moce_kernels.set_backend("fast")
    with pytest.raises(ValueError, match="unknown backend"):
        with moce_kernels.backend("nope"):
            pass


@pytest.fixture
def environment(monkeypatch):
    """``set(name, value)``: set an environment variable and read the settings again; restored after."""
    def set_env(name, value):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
        settings.reload()
    yield set_env
    monkeypatch.undo()
    settings.reload()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_backend_unavailable_without_gpu(environment):
    environment("MOCE_CUDA_EMULATION", "0")
    with pytest.raises(backends.BackendUnavailableError, match="cuda"):
        moce_kernels.set_backend("cuda")
    assert "cuda" not in moce_kernels.available_backends()


def test_context_manager_nests_and_restores():
    moce_kernels.set_backend("auto")
    with moce_kernels.backend("reference"):
        assert moce_kernels.get_backend() == "reference"
        with moce_kernels.backend("auto"):
            assert moce_kernels.get_backend() == "auto"
        assert moce_kernels.get_backend() == "reference"
    assert moce_kernels.get_backend() == "auto"


def test_environment_variable(environment):
    moce_kernels.set_backend(None)
    environment("MOCE_BACKEND", "reference")
    assert moce_kernels.get_backend() == "reference"
    environment("MOCE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown backend 'bogus' \\(from the environment variable MOCE_BACKEND\\)"):
        moce_kernels.get_backend()
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        moce_kernels.ops.moe_dispatch(torch.zeros(2, 1, dtype=torch.int64), 2)


def test_environment_is_read_at_import_and_on_reload_only(environment):
    """The environment is read once (and by ``settings.reload()``), not at each call."""
    moce_kernels.set_backend(None)
    environment("MOCE_BACKEND", "reference")
    os.environ["MOCE_BACKEND"] = "bogus"  # not read until the next reload (the fixture restores it)
    assert moce_kernels.get_backend() == "reference"
    settings.update(backend="auto")
    assert moce_kernels.get_backend() == "auto"


def test_set_backend_none_restores_the_environment_choice(environment):
    environment("MOCE_BACKEND", "reference")
    moce_kernels.set_backend("auto")
    assert moce_kernels.get_backend() == "auto"
    moce_kernels.set_backend(None)
    assert moce_kernels.get_backend() == "reference"
    environment("MOCE_BACKEND", None)
    assert moce_kernels.get_backend() == "auto"


def test_backend_blocks_are_per_thread(monkeypatch):
    """Two threads inside different ``backend()`` blocks at the same time each run their own choice,
    and a third thread outside any block runs the process-wide one (ops interleaved by barriers)."""
    ran = []

    def recording(name):
        impl = backends.implementation("moe_dispatch", name)

        def run(*args):
            ran.append((threading.current_thread().name, name))
            return impl(*args)
        return run

    stack = contextlib.ExitStack()
    for name in ("reference", "triton"):
        stack.enter_context(backends.override("moe_dispatch", name, recording(name)))
    moce_kernels.set_backend("reference")
    rounds, barrier, errors = 20, threading.Barrier(3), []
    idx = torch.randint(0, 4, (6, 1))

    def work(choice):
        try:
            ctx = moce_kernels.backend(choice) if choice else contextlib.nullcontext()
            with ctx:
                for _ in range(rounds):
                    barrier.wait(timeout=30)
                    moce_kernels.ops.moe_dispatch(idx, 4)
        except Exception as e:  # surfaced below with the thread's name
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(c,), name=n)
               for n, c in (("in_triton", "triton"), ("in_reference", "reference"), ("outside", None))]
    with stack:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    want = {"in_triton": "triton", "in_reference": "reference", "outside": "reference"}
    wrong = [(t, b) for t, b in ran if b != want[t]]
    assert len(ran) == 3 * rounds and not wrong, f"{len(wrong)} of {len(ran)} ops ran on another thread's backend"


def test_auto_on_cpu_resolves_to_reference():
    assert backends.resolve("window_fft_attention", torch.device("cpu"), "auto") == "reference"


def test_missing_implementation_names_op_and_backend():
    with pytest.raises(NotImplementedError, match="op 'no_such_op' has no 'reference' implementation"):
        backends.implementation("no_such_op", "reference")
    with pytest.raises(KeyError, match="no op 'no_such_op' is declared"):
        backends.register("no_such_op", "reference")


def test_ops_follow_the_selected_backend(monkeypatch):
    calls = []
    ref = backends.implementation("window_fft_attention", "reference")
    q = torch.randn(1, 2, 4, 4)
    w, b = torch.ones(2), torch.zeros(2)
    with moce_kernels.backend("reference"):
        moce_kernels.ops.window_fft_attention(q, q, q, 4, w, b)  # memoized before the override
        with backends.override("window_fft_attention", "reference", lambda *a: calls.append(1) or ref(*a)):
            moce_kernels.ops.window_fft_attention(q, q, q, 4, w, b)
    assert calls == [1]


def test_auto_order_on_cuda_follows_measurements():
    cuda = torch.device("cuda")
    assert backends._auto_order("window_fft_attention_backward", cuda)[0] == "triton"
    assert backends._auto_order("pointwise_depthwise_conv_gated", cuda)[0] == "reference"
    assert backends._auto_order("moe_route", cuda) == ("cuda", "triton", "reference")
    assert backends._auto_order("moe_experts", cuda)[-1] == "reference", "auto must stay capturable"
    assert backends._auto_order("window_fft_attention", torch.device("cpu")) == ("reference",)


def _declare_fake_op(monkeypatch, name):
    """A dispatch table for a test-only op, removed after the test."""
    table = backends.OpDispatch(name, backends.DEFAULT_CUDA_ORDER, (0,))
    monkeypatch.setitem(backends._OPS, name, table)
    monkeypatch.setitem(backends._IMPLS, name, table.impls)
    monkeypatch.setitem(backends._SUPPORT, name, table.support)
    return table


def test_declared_dtypes_decide_and_the_reference_takes_the_rest(monkeypatch):
    """A backend runs the dtypes it declares at registration; other calls, also with the backend named
    explicitly, run the reference. ``register`` without declarations takes every floating dtype."""
    if "triton" not in moce_kernels.available_backends():
        pytest.skip("needs the triton backend (interpreter) to name it")
    for name in ("fake_op_declared", "fake_op_default"):
        _declare_fake_op(monkeypatch, name)
    backends.register("fake_op_declared", "reference")(lambda: "reference")
    backends.register("fake_op_declared", "triton", dtypes=backends.FP32_AND_16BIT)(lambda: "triton")
    backends.register("fake_op_default", "triton")(lambda: "triton")
    cpu = torch.device("cpu")
    assert backends.resolve("fake_op_declared", cpu, "triton", {torch.bfloat16, torch.float32}) == "triton"
    assert backends.resolve("fake_op_declared", cpu, "triton", {torch.float64}) == "reference"
    assert backends.resolve("fake_op_declared", cpu, "triton", {torch.float32, torch.float64}) == "reference"
    assert backends.resolve("fake_op_declared", cpu, "triton") == "triton"  # no floating tensor argument
    assert backends.resolve("fake_op_default", cpu, "triton", {torch.float64}) == "triton"
    backends.register("fake_op_declared", "triton", devices=("cuda",))(lambda: "triton")
    with pytest.raises(backends.BackendUnavailableError, match="runs fake_op_declared on cuda tensors"):
        backends.resolve("fake_op_declared", cpu, "triton", {torch.float32})


def test_float64_runs_the_reference_under_a_backend_without_it(monkeypatch):
    """The kernels' backends declare float32/16-bit for the routing ops: a float64 call under them runs the
    reference implementation (no hand-written guard in the backend)."""
    fast = [b for b in moce_kernels.available_backends() if b != "reference"]
    if not fast:
        pytest.skip("no kernel backend here")
    calls = []
    ref = backends.implementation("moe_combine", "reference")
    rows = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    gates = torch.rand(2, 2, dtype=torch.float64)
    perm = torch.tensor([0, 2, 1, 3])
    with backends.override("moe_combine", "reference", lambda *a: calls.append(1) or ref(*a)):
        for b in fast:
            with moce_kernels.backend(b):
                out = moce_kernels.ops.moe_combine(rows, gates, perm)
            assert out.dtype == torch.float64
    assert calls == [1] * len(fast)


def test_backward_runs_on_the_forwards_backend_choice(monkeypatch):
    """The autograd engine runs the backward of CUDA tensors on threads of its own, where the caller's
    ``backend()`` block is not in force: an op's backward follows the choice of its forward. Simulated
    on the CPU by running the backward on another thread."""
    ran = []
    impl = backends.implementation("window_fft_attention_backward", "triton")

    def recording(*args):
        ran.append(threading.current_thread().name)
        return impl(*args)

    moce_kernels.set_backend("reference")
    q = torch.randn(1, 2, 4, 4, requires_grad=True)
    w, b = torch.ones(2), torch.zeros(2)
    with backends.override("window_fft_attention_backward", "triton", recording):
        with moce_kernels.backend("triton"):
            out = moce_kernels.ops.window_fft_attention(q, q, q, 4, w, b)
        worker = threading.Thread(target=lambda: out.sum().backward(), name="autograd-like")
        worker.start()
        worker.join()
    assert ran == ["autograd-like"] and q.grad is not None
