"""Test setup: without a GPU, Triton runs in its CPU interpreter (set before triton is imported) and
the CUDA C++ kernels in the CPU emulation (moce_kernels/emulation.py), so every backend is tested."""
import os
import random

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("MOCE_CUDA_EMULATION", "1")

import pytest  # noqa: E402

import moce_kernels  # noqa: E402

# Under pytest-xdist every worker is a process of its own: share the cores out instead of letting each
# run as many intra-op threads as there are cores (oversubscribed, the 2-core CI spent a fifth of its
# time in the kernel).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))

REFERENCE_DIR = os.environ.get(
    "MOCE_REFERENCE_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference"))


# Test modules by their CPU cost on the 2-core CI machine, longest first (measured, serial: the sm_90
# compile report ~260 s, window attention ~240 s, the CMake build ~110 s, ...). Run under
# `-n auto --dist loadscope --no-loadscope-reorder` the workers take whole modules in this order, so
# the long ones start at once instead of forming the tail (xdist's own order, by test count, left the
# compile report to start 9 minutes in).
_LONGEST_FIRST = ("test_static_resources", "test_window_attention_backends", "test_model_backends",
                  "test_cuda_build", "test_routing_backends", "test_experts_backends",
                  "test_expert_conv_backends", "test_compile_graph")


def _module_rank(item) -> int:
    name = item.nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")
    return _LONGEST_FIRST.index(name) if name in _LONGEST_FIRST else len(_LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_module_rank)  # stable: the order inside a module is kept
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Fresh random inputs every run, each test seeded on its own: the seed is drawn per test (or taken from
# MOCE_TEST_SEED) and printed, so a failing test's report shows the line that reproduces it.
_FIXED_SEED = os.environ.get("MOCE_TEST_SEED")


@pytest.fixture(autouse=True)
def _seed_and_backend(request):
    """Seed torch, random and numpy for this test and log the seed; reset the backend choice after."""
    seed = int(_FIXED_SEED) if _FIXED_SEED else random.SystemRandom().randrange(2 ** 31)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    print(f"seed {seed}: reproduce with MOCE_TEST_SEED={seed} pytest '{request.node.nodeid}'")
    yield
    moce_kernels.set_backend(None)


@pytest.fixture(scope="session")
def reference_dir():
    if not os.path.isdir(REFERENCE_DIR):
        pytest.fail(f"reference data not found at {REFERENCE_DIR}; set MOCE_REFERENCE_DIR")
    return REFERENCE_DIR


_FAIL_LOG = os.environ.get("MOCE_FAIL_LOG")


def pytest_runtest_logreport(report):
    """With MOCE_FAIL_LOG=path, append each failure as it happens (survives a killed run)."""
    if _FAIL_LOG and report.failed:
        seed = "".join(text for name, text in report.sections if "stdout" in name and "seed " in text)
        with open(_FAIL_LOG, "a") as f:
            f.write(f"==== {report.nodeid} [{report.when}]\n{seed[:300]}{str(report.longrepr)[-3000:]}\n")
