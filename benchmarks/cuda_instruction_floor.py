"""Instruction floor of the CUDA window-attention kernels, read from their sm_90 SASS (no GPU needed).

METHOD.md: two numbers first, bytes over bandwidth and operations over rate; the larger is the
floor. For `csrc/window_attention/kernels.cu` (exact fp32 FFTs on the CUDA cores) the operations are
*instructions*: every channel of a window row is one trip through each channel loop, and a lane
owns P pixels, so (instructions of a loop body) / P is that loop's issue cost per pixel and channel.
This script compiles the file with nvcc for sm_90, disassembles it with Triton's cuobjdump, finds
the channel loops (innermost loops of the main body that load from global memory; the split-combine
loops read only shared memory, and the `BRA.DIV` fallback code of `__syncwarp` placed after the body
is left out: uniform warps never take it) and prints, per kernel, instructions per pixel and channel
against the memory floor:

    ceiling = (bytes per pixel-channel / copy bandwidth) / (instructions per pixel-channel / issue rate)

Issue rate: 132 SMs x 4 schedulers x 1 warp-instruction per cycle x 32 lanes x 1.98 GHz (the H200's
boost clock, seen under load on this workplace's H200s); copy bandwidth 4.3 TB/s (KINDS.md, measured
there). Both are optimistic (perfect issue, no stalls, every instruction type at full rate), so the
ceiling is an upper bound on the fraction of the memory roofline the kernel can reach.

The kernels choose per launch whether each channel's convolution rows stay in shared memory (small
C per warp) or are recomputed in every pass; `--rows cached|recomputed` compiles one path only
(`-DMOCE_WFA_FORCE_YCACHE=1|0`), so that each loop holds that path.

Usage: python benchmarks/cuda_instruction_floor.py [--rows cached|recomputed] [--dtype bfloat16|float16|float32]
       [--json FILE] [--sass FILE]
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "csrc" / "window_attention" / "kernels.cu"
ISSUE_RATE = 132 * 4 * 32 * 1.98e9   # lane-instructions per second
COPY_BW = 4.3e12                     # bytes per second (read + write)
ELEMENTS = {"fwd": 4, "bwd": 7}      # tensors moved per pixel and channel (notes: "What must move")
MANGLED = {"bfloat16": "13__nv_bfloat16", "float16": "6__half", "float32": "f"}
SIZES = {"bfloat16": 2, "float16": 2, "float32": 4}
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_BRANCH = re.compile(r"\bBRA(?:\.(\w+))?\s+(?:.*?)0x([0-9a-f]+)")


def _cuobjdump() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def compile_sass(rows: str) -> str:
    """SASS of every kernel in kernels.cu, compiled for sm_90 as setup.py does (-O3), with the
    convolution rows `cached` in shared memory or `recomputed` in every pass."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "wa.cubin"
        subprocess.run(["nvcc", "-std=c++17", "-O3", "-cubin", "-gencode", "arch=compute_90,code=sm_90",
                        f"-DMOCE_WFA_FORCE_YCACHE={int(rows == 'cached')}", f"-I{ROOT / 'csrc'}", str(SOURCE),
                        "-o", str(cubin)], check=True)
        return subprocess.run([str(_cuobjdump()), "-sass", str(cubin)], check=True, capture_output=True,
                              text=True).stdout


def channel_loops(body: str) -> List[Tuple[int, int]]:
    """(start, end) addresses of a kernel's channel loops: the innermost loops of its main body that
    read global memory (q, k, v or the gradient of a channel)."""
    ins = [(int(a, 16), text.strip()) for a, text in _INSTR.findall(body)]
    branches = [(addr, m) for addr, text in ins for m in [_BRANCH.search(text)] if m]
    ldg_at = [addr for addr, text in ins if re.search(r"\bLDG\b", text)]
    fallback = min((int(m.group(2), 16) for _, m in branches if m.group(1) == "DIV"), default=float("inf"))
    loops = [(int(m.group(2), 16), addr) for addr, m in branches
             if m.group(1) != "DIV" and int(m.group(2), 16) < addr < fallback]
    inner = [lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    return sorted(lp for lp in inner if any(lp[0] <= a <= lp[1] for a in ldg_at))


def report(sass: str, dtype: str) -> List[Dict]:
    rows = []
    for chunk in re.split(r"\n\s*Function : ", sass)[1:]:
        name = chunk.split("\n", 1)[0]
        m = re.search(r"(fwd|bwd)_kernelI" + re.escape(MANGLED[dtype]) + r"Li(\d+)E", name)
        if not m:
            continue
        kind, p = m.group(1), int(m.group(2))
        loops = channel_loops(chunk)
        per_px = [((e - s) // 16 + 1) / p for s, e in loops]   # 16 bytes per sm_90 instruction
        instr = sum(per_px)
        mem_s = ELEMENTS[kind] * SIZES[dtype] / COPY_BW
        ceiling = mem_s / (instr / ISSUE_RATE) if instr else float("nan")
        rows.append({"kernel": kind, "p": p, "dtype": dtype, "channel_loops_instr_per_px": [round(x, 1) for x in per_px],
                     "instr_per_px_ch": round(instr, 1), "ceiling_fraction_of_memory_roofline": round(min(ceiling, 1.0), 2)})
    return sorted(rows, key=lambda r: (r["kernel"], r["p"]))


def cached(path: Optional[Path], build: Callable[[], str]) -> str:
    """The listing saved at path if there is one, else build()'s (saved to path when one is given)."""
    if path is not None and path.exists():
        return path.read_text()
    text = build()
    if path is not None:
        path.write_text(text)
    return text


def table(title: str, columns: List[str], rows: List[Dict], json_path: Optional[Path],
          cells: Callable[[Dict], List]) -> None:
    """Prints rows as a markdown table under a title line, and saves them as JSON when asked."""
    print(title)
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(str(c) for c in cells(r)) + " |")
    if json_path:
        json_path.write_text(json.dumps(rows, indent=1))


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="recomputed", choices=["cached", "recomputed"])
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(MANGLED))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--sass", type=Path, help="read (or, if missing, write) the disassembly here")
    args = parser.parse_args(argv)
    rows = report(cached(args.sass, lambda: compile_sass(args.rows)), args.dtype)
    columns = ["kernel", "p", "dtype", "channel loops (instr / px / channel)", "total",
               "ceiling (fraction of memory roofline)"]
    table(f"convolution rows {args.rows}", columns, rows, args.json, lambda r: [
        r["kernel"], r["p"], r["dtype"], " + ".join(str(x) for x in r["channel_loops_instr_per_px"]),
        r["instr_per_px_ch"], f"{r['ceiling_fraction_of_memory_roofline']:.2f}"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
