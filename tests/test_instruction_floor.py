"""The SASS reader of benchmarks/cuda_instruction_floor.py picks the channel loops (the innermost loops
of the main body that read global memory) and nothing else: not the statistics-combine loop (shared
memory only), not the `BRA.DIV` fallback code after the body whose jumps back look like loops."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import cuda_instruction_floor as floor  # noqa: E402


def _sass(lines):
    body = "\n".join(f"        /*{a:04x}*/   {text} ;   /* 0x0 */" for a, text in lines)
    return ("\n\tFunction : _ZN4moce3wfa43_GLOBAL__N__x10fwd_kernelI13__nv_bfloat16Li4EEEvNS0_7FwdArgsEi\n"
            + body + "\n")


def _program(stats_len: int, out_len: int):
    """A body shaped like the real one: a statistics loop (global loads, a __syncwarp), a combine loop
    (shared loads only), an output loop (global loads), EXIT, then divergent fallback code that jumps
    back into the loops."""
    lines, a = [(0x0, "MOV R1, c[0x0][0x28]")], 0x10
    start1 = a
    for i in range(stats_len - 1):
        lines.append((a, {1: "LDG.E.U16 R8, desc[UR4][R10.64]", 3: "BRA.DIV UR4, 0x9000"}.get(i, "FADD R2, R2, R3")))
        a += 0x10
    lines.append((a, f"@!P6 BRA 0x{start1:x}"))
    a += 0x10
    start2 = a
    for i in range(9):
        lines.append((a, "LDS R7, [R9]" if i == 2 else "FFMA R4, R4, R5, R6"))
        a += 0x10
    lines.append((a, f"@!P2 BRA 0x{start2:x}"))
    a += 0x10
    start3 = a
    for i in range(out_len - 1):
        lines.append((a, {5: "BRA.DIV UR6, 0x9400", 7: "LDG.E R11, desc[UR4][R12.64]"}.get(i, "FMUL R2, R2, R3")))
        a += 0x10
    lines.append((a, f"@!P4 BRA 0x{start3:x}"))
    lines.append((a + 0x10, "EXIT"))
    lines += [(0x9000, "WARPSYNC.COLLECTIVE R35, 0x9030"), (0x9010, f"BRA 0x{start1 + 0x50:x}"),
              (0x9400, "WARPSYNC.COLLECTIVE R35, 0x9430"), (0x9410, f"BRA 0x{start3 + 0x20:x}")]  # overlaps loop 3 (and its load)
    return _sass(lines), (start1, start2, start3)


def test_channel_loops_are_the_loops_with_a_warp_transpose():
    sass, (s1, _, s3) = _program(stats_len=40, out_len=24)
    chunk = sass.split("Function : ")[1]
    loops = floor.channel_loops(chunk)
    assert [lp[0] for lp in loops] == [s1, s3]
    assert [(e - s) // 16 + 1 for s, e in loops] == [40, 24]


def test_report_counts_instructions_per_pixel_and_channel():
    sass, _ = _program(stats_len=40, out_len=24)
    (row,) = floor.report(sass, "bfloat16")
    assert (row["kernel"], row["p"]) == ("fwd", 4)
    assert row["channel_loops_instr_per_px"] == [10.0, 6.0]      # loop length / p
    assert row["instr_per_px_ch"] == 16.0
    mem_s = 4 * 2 / floor.COPY_BW
    assert abs(row["ceiling_fraction_of_memory_roofline"] - min(1.0, round(mem_s / (16 / floor.ISSUE_RATE), 2))) < 1e-9
    assert floor.report(sass, "float32") == []                    # no fp32 kernel in this listing
