"""The CPU emulation of CUDA (csrc/emulation) that runs backend ``cuda`` in CI: it computes what a
GPU computes for correct kernels and exposes the usual kernel bugs rather than hiding them
(csrc/emulation/selftest.cu holds the probe kernels)."""
import ctypes
import os

import numpy as np
import pytest

from moce_kernels import emulation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(emulation.why_unavailable() is not None,
                                reason=f"CUDA emulation unavailable: {emulation.why_unavailable()}")

SUCCESS, INVALID_VALUE, INVALID_CONFIGURATION, RAISED = 0, 1, 9, -1


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    path = emulation.compile_library(os.path.join(ROOT, "csrc", "emulation", "selftest.cu"),
                                     str(tmp_path_factory.mktemp("emu")))
    lib = ctypes.CDLL(path)
    lib.probe_message.restype = ctypes.c_char_p
    return lib


def _ptr(a: np.ndarray):
    return a.ctypes.data_as(ctypes.c_void_p)


def _seed(monkeypatch, seed: int) -> None:
    # the emulation reads MOCE_EMU_SEED once per thread; each probe of a seed runs in a fresh thread
    monkeypatch.setenv("MOCE_EMU_SEED", str(seed))


def test_block_reduction_is_exact(lib):
    x = np.random.rand(1000).astype(np.float32)
    out = np.full(1, np.nan, np.float32)
    assert lib.probe_block_sum(_ptr(x), x.size, _ptr(out), 0) == SUCCESS
    assert abs(out[0] - x.astype(np.float64).sum()) < 1e-3


def test_missing_barrier_gives_wrong_results(lib):
    """Without the barrier, thread 0 reads partials other warps have not written yet."""
    x = np.ones(256 * 8, np.float32)
    results = set()
    for _ in range(8):
        out = np.full(1, np.nan, np.float32)
        assert lib.probe_block_sum(_ptr(x), x.size, _ptr(out), 1) == SUCCESS
        results.add(float(out[0]))
    assert results != {2048.0}, "a racy kernel always gave the right answer: the emulation hides races"


def test_barrier_in_divergent_code_is_an_error(lib):
    out = np.zeros(64, np.float32)
    assert lib.probe_divergent_barrier(_ptr(out)) == RAISED
    assert b"every thread must reach it" in lib.probe_message()


def test_blocks_run_in_random_order(lib):
    orders = set()
    for _ in range(6):
        acc = np.zeros(1, np.int32)
        seen = np.full(8, -1, np.int32)
        assert lib.probe_order_dependent(8, _ptr(acc), _ptr(seen)) == SUCCESS
        assert acc[0] == 36
        orders.add(tuple(seen))
    assert len(orders) > 1


def test_launch_limits(lib):
    assert lib.probe_launch(1, 1024) == SUCCESS
    assert lib.probe_launch(1, 1025) == INVALID_CONFIGURATION
    assert lib.probe_launch(65536, 32) == INVALID_CONFIGURATION
    out = np.full(128, np.nan, np.float32)
    assert lib.probe_big_smem(128, 0, _ptr(out)) == INVALID_VALUE  # > 48 KiB without the opt-in
    assert np.isnan(out).all()
    assert lib.probe_big_smem(128, 1, _ptr(out)) == SUCCESS
    assert (out == (np.arange(128) + 1) % 128).all()


@pytest.mark.parametrize("threads", [32, 64, 96])
def test_warp_collectives(lib, threads):
    out = np.full((threads, 7), -7, np.int32)
    assert lib.probe_warp_ops(threads, _ptr(out)) == SUCCESS
    lane = np.arange(threads) % 32
    assert (out[:, 0] == lane ^ 5).all()
    assert (out[:, 1] == np.where(lane + 3 < 32, lane + 3, lane)).all()
    assert (out[:, 2] == np.where(lane >= 2, lane - 2, lane)).all()
    assert (out[:, 3] == 7).all()
    assert (out[:, 4].astype(np.uint32) == 0xAAAAAAAA).all()
    groups = np.array([0xFF << (8 * (l // 8)) for l in lane], dtype=np.uint64).astype(np.uint32)
    assert (out[:, 5].astype(np.uint32) == groups).all()
    assert (out[:, 6] == 16).all()


def test_wmma_product(lib):
    a = np.random.randn(16, 16).astype(np.float16)
    b = np.random.randn(16, 16).astype(np.float16)
    c = np.full((16, 16), np.nan, np.float32)
    assert lib.probe_wmma(_ptr(a), _ptr(b), _ptr(c)) == SUCCESS
    ref = a.astype(np.float64) @ b.astype(np.float64)
    assert np.abs(c - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
