"""The grouped-convolution kernels' device math (csrc/common/device_math.cuh), compiled for the CPU
emulation, against float64: the exact (erf) GELU and the cheaper one of the 16-bit epilogues.

The emulation computes sfu<kEx2> and sfu<kRcp> exactly; on a GPU they are the special-function
unit's approximations (about 2 ulp), which move gelu16_f by less than 2e-7 more (a float32 model with
relative errors of 2.4e-7 in the reciprocal and 2e-6 in the exponential stays below 4e-7): inside
the same 1e-6 bound."""
import ctypes
import math
import os

import numpy as np
import pytest

from moce_kernels import emulation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(emulation.why_unavailable() is not None,
                                reason=f"CUDA emulation unavailable: {emulation.why_unavailable()}")


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    path = emulation.compile_library(os.path.join(ROOT, "tests", "probes", "device_math.cu"),
                                     str(tmp_path_factory.mktemp("emu")))
    return ctypes.CDLL(path)


def _gelu(lib, x: np.ndarray, which: int) -> np.ndarray:
    out = np.full_like(x, np.nan)
    ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    assert lib.probe_gelu(ptr(x), ptr(out), x.size, which) == 0
    return out


def _exact(x: np.ndarray) -> np.ndarray:
    return np.array([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x.astype(np.float64)])


@pytest.mark.parametrize("which, bound", [(0, 1e-6), (1, 1e-6)])
def test_gelu_within_bound(lib, which, bound):
    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(-12, 12, 4801), rng.standard_normal(4000) * 3,
                        rng.standard_normal(1000) * 1e-3, [0.0, -0.0, 1e-30, -1e-30, 40.0, -40.0]]).astype(np.float32)
    got = _gelu(lib, x, which).astype(np.float64)
    err = np.abs(got - _exact(x)) / np.maximum(1.0, np.abs(x))
    assert np.isfinite(got).all()
    assert err.max() <= bound, f"max error {err.max():.3g} at x = {x[err.argmax()]}"
    # near zero the GELU is x / 2 + x^2 / sqrt(2 pi): relative accuracy, not only absolute
    small = np.abs(x) < 1e-2
    rel = np.abs(got[small] - _exact(x[small])) / np.maximum(np.abs(_exact(x[small])), 1e-38)
    assert rel[x[small] != 0].max() < 1e-5


def test_bound_rejects_the_tanh_approximation(lib):
    """The bound above is tight enough to fail the tanh GELU (error ~1e-4 near |x| = 2)."""
    x = np.linspace(-4, 4, 801).astype(np.float32)
    tanh = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    assert (np.abs(tanh - _exact(x)) / np.maximum(1.0, np.abs(x))).max() > 1e-5
    assert (np.abs(_gelu(lib, x, 1) - _exact(x)) / np.maximum(1.0, np.abs(x))).max() <= 1e-6
