"""CPU inference keeps freed activations in the heap (``moce_kernels.allocator``): a forward's large
buffers are reused in place instead of being mapped anew, page by page, at every forward.

Each case runs in a fresh interpreter: the allocator's settings are process-wide."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")


def _run(code: str, **env: str) -> str:
    full_env = dict(os.environ, PYTHONPATH=ROOT, **env)
    full_env.pop("MOCE_CPU_MALLOC", None)
    full_env.update(env)
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         env=full_env, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().splitlines()[-1]


_FAULTS = """
    import resource, torch
    from moce_kernels import allocator
    torch.set_num_threads(1)
    {setup}
    def churn():  # a forward's activations: blocks of 1-64 MiB, written, then freed
        for _ in range(4):
            blocks = [torch.empty(mib << 18).fill_(1.0) for mib in (40, 1, 8, 3, 64, 16, 2)]
            del blocks
    churn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    churn()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's")
def test_freed_activations_are_reused_without_page_faults():
    default = int(_run(_FAULTS.format(setup="")))
    kept = int(_run(_FAULTS.format(setup="assert allocator.keep_cpu_memory()")))
    assert default > 2000, f"the default allocator should return the large blocks to the kernel ({default} faults)"
    assert kept < default / 20, f"{kept} minor faults with the settings against {default} without"


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's")
def test_first_cpu_forward_applies_the_settings_unless_opted_out():
    code = """
        import torch
        from moce_kernels import MoCEIR, allocator
        assert allocator.applied() is None
        model = MoCEIR(dim=8).eval()
        with torch.no_grad():
            model(torch.rand(1, 3, 16, 16))
        print(allocator.applied())
    """
    assert _run(code) == "True"
    assert _run(code, MOCE_CPU_MALLOC="default") == "False"
