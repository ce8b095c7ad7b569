"""The Triton kernels compiled for sm_90 (H100/H200) without a GPU: no register spills, and every
matrix product in a 16-bit run on tensor cores.

Both were real performance bugs found this way (benchmarks/static_report.py): the fused pw->dw
kernel spilled up to 14.5 KB per thread (fully unrolled 7x7 taps), and its 1x1 products ran on
FMA units. The report compiles exactly what the ops launch (same constexprs and warps) through a
fake sm_90 driver, in a subprocess because this test session runs Triton in its interpreter.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_TOOLS = None
try:
    import triton
    _TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
except ImportError:  # pragma: no cover - triton is a dependency
    pass

pytestmark = pytest.mark.skipif(
    _TOOLS is None or not all((_TOOLS / t).exists() for t in ("ptxas", "cuobjdump", "nvdisasm")),
    reason="needs Triton's bundled ptxas / cuobjdump / nvdisasm")


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("static") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "static_report.py"), "--dtype", "bfloat16",
                          "--family", "window_attention", "--family", "expert_conv", "--family", "channel_attention",
                          "--family", "model", "--json", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    recs = json.loads(out.read_text())
    names = {r["kernel"] for r in recs}
    assert {"_wfa_fwd_kernel", "_wfa_bwd_kernel", "_wfa_fwd_oneshot_kernel", "_wfa_bwd_oneshot_kernel",
            "_pwdw_kernel", "_pwdw_bwd_kernel", "_epilogue_bwd_kernel", "_route_head_bwd_kernel", "_combine_kernel",
            "_gemm_kernel", "_attn_fwd_kernel", "_attn_bwd_kernel", "_qk_grad_kernel"} <= names, names
    assert "stopped" not in res.stdout, res.stdout[-3000:]
    return recs


def _label(r) -> str:
    return f"{r['kernel']} {r['constexprs']} (regs {r.get('regs')}, {r['num_warps']} warps)"


def test_no_spills(records):
    """No local-memory traffic: no LDL / STL instruction and no local arrays. (A stack frame that no
    instruction touches is not a spill: ptxas sometimes reserves 8 B it never uses, e.g. the one-shot
    window-attention backward at p = 8.)"""
    bad = [_label(r) + f": stack {r.get('stack')} B, LDL {r['sass'].get('LDL', 0)}, STL {r['sass'].get('STL', 0)}"
           for r in records if r.get("local", 0) or r["sass"].get("LDL", 0) or r["sass"].get("STL", 0)]
    assert not bad, "kernels using local memory:\n" + "\n".join(bad)


def test_products_on_tensor_cores(records):
    bad = [_label(r) for r in records
           if r["dots"] and not (r["sass"].get("HMMA", 0) or r["sass"].get("HGMMA", 0))]
    assert not bad, "bf16 kernels whose tl.dot runs without tensor-core instructions:\n" + "\n".join(bad)
