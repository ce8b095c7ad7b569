"""NVTX ranges: off by default and free when off; switchable."""
import torch

from moce_kernels import nvtx


def test_off_is_a_shared_null_context(monkeypatch):
    monkeypatch.setattr(nvtx, "_ENABLED", False)
    assert nvtx.nvtx_range("a") is nvtx.nvtx_range("b")


def test_enable_toggles_and_annotate_passes_through(monkeypatch):
    monkeypatch.setattr(nvtx, "_ENABLED", False)
    nvtx.enable(True)
    assert nvtx.enabled()
    calls = []

    @nvtx.annotate("block")
    def f(x):
        calls.append(x)
        return x * 2

    assert f(3) == 6 and calls == [3]
    if not torch.cuda.is_available():  # no CUDA: ranges degrade to no-ops, never errors
        assert nvtx.nvtx_range("x") is nvtx._NULL
    nvtx.enable(False)
    assert not nvtx.enabled()
