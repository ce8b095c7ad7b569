"""Issue cost of the CUDA fused pw->dw forward, read from its sm_90 SASS (no GPU needed).

METHOD.md's second number for `csrc/grouped_conv/pwdw_forward.cu`: lane-instructions per output
element (one output channel at one pixel), against the budget that the memory floor leaves. The file
is compiled for sm_90 with line information and disassembled with Triton's nvdisasm; in each kernel
the script finds four loops and weights each body by its trip count per block (Geo in
`pwdw_tile.cuh`: CG pw rows per block, an 8 x 32 output tile, 256 threads):

* step:  the innermost loop holding the 1x1's MMAs and x's loads, one K step of 16 input channels and
         part of the halo per trip (stage x and the weights, MMAs; nvcc may unroll it, so a trip's
         count is divided by its steps, two barriers each): 256 threads x NPART ceil(C_in / 16) steps;
* part:  the loop around it (accumulator set-up and store), minus the step loop: 256 threads x NPART
         (Geo::NPART of the window layout: 3 at k = 3, 4 at k = 7);
* patch: the zero-padding pass over the 1x1 result (the loop holding the line that writes
         `y[32 * u]` in `pw_halo`): a warp per pw row, 256 threads x CG / 8 trips, in the blocks whose
         halo crosses the image's edge (`edge_fraction` of them at 128 x 128);
* dw:    the depthwise loop (innermost loops that store to global memory; on tensor cores for 16-bit
         inputs; the one storing 32-bit pairs when there are two): a warp per output
         channel, 32 lanes x (output channels of the block) trips.

Dividing by the block's outputs (output channels x 256 pixels) gives lane-instructions per output;
the memory floor allows (bytes per output / copy bandwidth) x issue rate of them, so

    ceiling = budget / instructions   (fraction of the memory roofline at perfect issue)

with the issue rate and bandwidth of cuda_instruction_floor.py (perfect issue: an upper bound).
Only the 16-bit paths are modelled (the speed targets are for bf16; fp32 runs its 1x1 on FMAs).

Usage: python benchmarks/cuda_instruction_floor_pwdw.py [--dtype bfloat16|float16] [--json FILE] [--sass FILE]
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_instruction_floor import _INSTR, COPY_BW, ISSUE_RATE, MANGLED, ROOT, _cuobjdump, cached, table  # noqa: E402

SOURCE = ROOT / "csrc" / "grouped_conv" / "pwdw_forward.cu"
TILE = ROOT / "csrc" / "grouped_conv" / "pwdw_tile.cuh"
PATCH_LINE = re.compile(r"y\[32 \* u\] = from_f<Y>\(0\.f\)")
_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')


@dataclass
class Case:
    name: str
    cin: int
    cout: int   # pw output rows (2x the outputs for the gated variant)
    k: int
    mode: int   # 0 plain, 1 gated


# the benchmark's trunk cases (MoCE-IR level 1, C = 96) and the rank-48 experts (bench_expert_conv.py)
CASES = [Case("qkv", 96, 288, 3, 0), Case("xkv", 96, 192, 7, 0), Case("gdfn", 96, 384, 3, 1),
         Case("exp_q_r48", 48, 48, 3, 0), Case("exp_kv_r48", 48, 96, 7, 0)]


def compile_listing() -> str:
    """nvdisasm listing (with source lines) of every kernel in pwdw_forward.cu, built for sm_90 -O3."""
    nvdisasm = _cuobjdump().parent / "nvdisasm"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "pwdw.cubin"
        subprocess.run(["nvcc", "-std=c++17", "-O3", "-lineinfo", "-cubin", "-gencode", "arch=compute_90,code=sm_90",
                        f"-I{ROOT / 'csrc'}", str(SOURCE), "-o", str(cubin)], check=True)
        return subprocess.run([str(nvdisasm), "-g", "-c", str(cubin)], check=True, capture_output=True,
                              text=True).stdout


def parse(chunk: str) -> Tuple[List[Tuple[int, str, Optional[str]]], Dict[str, int]]:
    """(address, instruction, 'file:line') of a kernel's instructions, and its label addresses."""
    ins, labels, where = [], {}, None
    pending: List[str] = []
    for line in chunk.split("\n"):
        m = _LINE.search(line)
        if m:
            where = f"{Path(m.group(1)).name}:{m.group(2)}"
            continue
        lab = re.match(r"^(\.L_x_\d+):", line.strip())
        if lab:
            pending.append(lab.group(1))
            continue
        m = _INSTR.search(line)
        if m:
            addr = int(m.group(1), 16)
            for name in pending:
                labels[name] = addr
            pending = []
            ins.append((addr, m.group(2).strip(), where))
    return ins, labels


def loops(ins, labels) -> List[Tuple[int, int]]:
    """(start, end) of every backward branch that is not a divergence fallback."""
    out = []
    for addr, text, _ in ins:
        m = re.search(r"\bBRA(\.\w+)?\s.*?(\.L_x_\d+|0x[0-9a-f]+)", text)
        if not m or (m.group(1) or "").startswith(".DIV"):
            continue
        tgt = labels.get(m.group(2)) if m.group(2).startswith(".L") else int(m.group(2), 16)
        if tgt is not None and tgt < addr:
            out.append((tgt, addr))
    return sorted(set(out))


def _opcode(text: str) -> str:
    """The opcode of an instruction with its modifiers, without its predicate."""
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]


def _op(text: str) -> str:
    """The opcode of an instruction, without its predicate and modifiers."""
    return _opcode(text).split(".")[0]


def _body(ins, lp) -> List[Tuple[int, str, Optional[str]]]:
    return [x for x in ins if lp[0] <= x[0] <= lp[1]]


def roles(ins, labels, patch_lines: List[str]) -> Dict[str, int]:
    """Instructions per trip of the step, part (less its step loop), patch and dw loops."""
    lps = loops(ins, labels)
    inner = [lp for lp in lps if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in lps)]

    def n(lp):
        return len(_body(ins, lp))

    def ops(lp):
        return {_op(t) for _, t, _ in _body(ins, lp)}

    def per_step(lp):
        """Instructions per K step: nvcc may unroll the step loop (each step has two barriers)."""
        bars = sum(_op(t) == "BAR" for _, t, _ in _body(ins, lp))
        if bars == 0 or bars % 2:
            raise ValueError(f"a step loop with {bars} barriers")
        return n(lp) / (bars // 2)

    # loads x from global memory and multiplies; the depthwise loop (which may multiply too, on tensor
    # cores) is the one that stores to global memory. The 16-byte cp.async step (LDGSTS .128 only) is
    # the one the benchmark shapes take (W % 8 == 0); those with x by 8-byte (LDGSTS .64: W % 4 == 0) or
    # 4-byte copies (W even) and the element-wise fallback (LDG) are reported beside it.
    def kind(lp) -> Optional[str]:
        if "HMMA" not in ops(lp) or "STG" in ops(lp):
            return None
        # each copy's size in bits: a .128 or .64 modifier, else 32
        widths = {next((int(w) for w in ("128", "64") if w in _opcode(t).split(".")), 32)
                  for _, t, _ in _body(ins, lp) if _op(t) == "LDGSTS"}
        if widths:
            return {128: "chunks", 64: "quads", 32: "pairs"}[min(widths)]
        return "elementwise" if "LDG" in ops(lp) else None

    steps = {k: [lp for lp in inner if kind(lp) == k] for k in ("chunks", "quads", "pairs", "elementwise")}
    step = steps["chunks"] or steps["elementwise"]
    if len(step) != 1 or any(len(v) > 1 for v in steps.values()):
        raise ValueError(f"expected one MMA step loop of each kind, found {({k: len(v) for k, v in steps.items()})}")
    step = step[0]
    part = min((lp for lp in lps if lp != step and lp[0] <= step[0] and step[1] <= lp[1]), key=n)
    patch = [lp for lp in lps if lp not in (part,) and any(w in patch_lines for _, _, w in _body(ins, lp))]
    # innermost among the loops that store (it may hold a small loop without stores: OutWalk's wrap)
    stores = [lp for lp in lps if "STG" in ops(lp)]
    dw = [lp for lp in stores if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in stores)]
    if not patch or not dw:
        raise ValueError("patch or depthwise loop not found")
    # the epilogue that stores output pairs as 32-bit words (W even: the benchmark shapes), and the one
    # that stores single 16-bit elements
    pairs = [lp for lp in dw if any(_op(t) == "STG" and ".U16" not in t for _, t, _ in _body(ins, lp))]
    singles = [lp for lp in dw if lp not in pairs]
    out = {"step": per_step(step), "part": n(part) - n(step), "patch": max(n(lp) for lp in patch),
           "dw": max(n(lp) for lp in (pairs or dw))}
    if steps["chunks"]:
        for k in ("quads", "pairs", "elementwise"):   # the fallbacks' steps, for rows not 16-byte aligned
            if steps[k]:
                out[f"step_{k}"] = per_step(steps[k][0])
    if pairs and singles:
        out["dw_single"] = max(n(lp) for lp in singles)  # the fallback's epilogue, for odd W
    return out


def parts(k: int) -> int:
    """Geo::NPART of the 16-bit forward's window layout: 8 + k - 1 rows of 48 pixels, 3 16-pixel tiles
    each, in parts of at most 12 tiles."""
    return -(-3 * (8 + k - 1) // 12)


def edge_fraction(k: int, H: int = 128, W: int = 128) -> float:
    """Share of the 8 x 32 output tiles of an H x W image whose halo (k // 2 pixels) leaves the image:
    the blocks that run the zero-padding pass (pw_halo skips it for the others)."""
    P = k // 2
    tiles = [(y, x) for y in range(0, H, 8) for x in range(0, W, 32)]
    edge = [t for t in tiles if not (t[0] >= P and t[0] + 8 + P <= H and t[1] >= P and t[1] + 32 + P <= W)]
    return len(edge) / len(tiles)


def per_output(r: Dict[str, int], case: Case, elem_bytes: int) -> Dict:
    """Lane-instructions per output of one 8 x 32 tile's blocks (the last channel block may be partial:
    the step, half and patch loops run for all CG rows, the depthwise loop for valid channels only)."""
    cg = 64                                         # 16-bit paths: 64 pw rows per block (kFwdGroup)
    nb = 2 if case.mode else 1
    nout = case.cout // nb                          # output channels
    blocks = -(-nout // (cg // nb))                 # channel blocks per tile
    nparts = parts(case.k)
    steps = nparts * -(-case.cin // 16)
    lane = {"step": r["step"] * 256 * steps * blocks, "part": r["part"] * 256 * nparts * blocks,
            "patch": r["patch"] * 256 * (cg // 8) * blocks * edge_fraction(case.k), "dw": r["dw"] * 32 * nout}
    per = {k: v / (nout * 256) for k, v in lane.items()}
    total = sum(per.values())
    bytes_per_out = elem_bytes * (case.cin + nout) / nout
    budget = bytes_per_out / COPY_BW * ISSUE_RATE
    row = {"case": case.name, **{k: round(v, 1) for k, v in per.items()}, "total": round(total, 1),
           "budget_at_roofline": round(budget, 1), "ceiling": round(min(budget / total, 1.0), 2)}
    def other(step: float, dw: float) -> float:   # the total with another step and depthwise loop
        return round(total + ((step - r["step"]) * 256 * steps * blocks + (dw - r["dw"]) * 32 * nout)
                     / (nout * 256), 1)

    if "step_quads" in r:        # W % 8 == 4: x by 8-byte copies, output pairs
        row["total_quads"] = other(r["step_quads"], r["dw"])
    if "step_pairs" in r:        # W % 4 == 2: x by 4-byte copies, output pairs
        row["total_pairs"] = other(r["step_pairs"], r["dw"])
    if "step_elementwise" in r:  # odd W: element-wise staging, single stores
        row["total_elementwise"] = other(r["step_elementwise"], r.get("dw_single", r["dw"]))
    return row


def report(listing: str, dtype: str) -> List[Dict]:
    tile = TILE.read_text().split("\n")
    patch_lines = [f"{TILE.name}:{i + 1}" for i, line in enumerate(tile) if PATCH_LINE.search(line)]
    kernels = {}
    for chunk in re.split(r"\n//-+ \.text\.", listing)[1:]:
        m = re.search(r"pwdw_fwd_kernelI" + re.escape(MANGLED[dtype]) + r"Li(\d)ELi(\d)E", chunk.split("\n", 1)[0])
        if m:
            kernels[(int(m.group(1)), int(m.group(2)))] = roles(*parse(chunk), patch_lines)
    return [{**per_output(kernels[(c.k, c.mode)], c, 2), "per_trip": kernels[(c.k, c.mode)]} for c in CASES]


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--sass", type=Path, help="read (or, if missing, write) the listing here")
    args = parser.parse_args(argv)
    rows = report(cached(args.sass, compile_listing), args.dtype)
    columns = ["case", "step", "part", "patch", "dw", "total", "budget at roofline", "ceiling",
               "total, W % 8 = 4 (8-byte copies)", "total, W % 4 = 2 (4-byte copies)",
               "total, W odd (element-wise staging, single stores)"]
    table("lane-instructions per output element (one channel at one pixel), by loop; budget = what the memory "
          "floor allows at perfect issue", columns, rows, args.json, lambda r: [
              *(r[c] for c in ("case", "step", "part", "patch", "dw", "total", "budget_at_roofline")),
              f"{r['ceiling']:.2f}", *(r.get(k, "") for k in ("total_quads", "total_pairs", "total_elementwise"))])
    return 0


if __name__ == "__main__":
    sys.exit(main())
