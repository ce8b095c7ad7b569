"""The SASS reader of benchmarks/cuda_instruction_floor.py picks the channel loops (the innermost loops
of the main body that read global memory) and nothing else: not the statistics-combine loop (shared
memory only), not the `BRA.DIV` fallback code after the body whose jumps back look like loops."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

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


# --- the fused pw->dw forward's reader (benchmarks/cuda_instruction_floor_pwdw.py) ----------------------
import cuda_instruction_floor_pwdw as pwdw  # noqa: E402


def _listing(unroll: int = 1, pairs: bool = False, copies=("LDG.E.U16 R8, desc[UR4][R2.64]",)):
    """An nvdisasm -g listing shaped like pwdw_fwd_kernel<bf16, 3, 0>: a part loop around an MMA step
    loop (unrolled `unroll` times: two barriers per step), a patch loop (its line is the patch line), a
    depthwise loop storing to global memory, and a divergence fallback whose jump back must not count as
    a loop. With `pairs`, a second depthwise loop stores 32-bit pairs and holds a small loop without
    stores (OutWalk's wrap). `copies`: x's load in the step loop; with more than one, a part loop and
    step loop for each (the staging ways of Stager), each step 2 instructions longer than the one
    before, and, as there, a 16-byte weight copy beside the narrower cp.async of x."""
    out, a = [], 0

    def ins(text, line=10):
        nonlocal a
        out.append(f'\t//## File "/r/csrc/grouped_conv/pwdw_tile.cuh", line {line}')
        out.append(f"        /*{a:04x}*/                   {text} ;")
        a += 0x10

    def loop(label, n, body, line=10):
        out.append(f"{label}:")
        for i in range(n - 1):
            ins(body(i), line)
        ins(f"@!P0 BRA `({label})", line)

    def step(copy, n):  # one step: n instructions
        weights = "@!P3 LDGSTS.E.BYPASS.128 [R9+0x100], desc[UR4][R2.64], !P1" if "LDGSTS" in copy else copy
        return lambda i: ("BAR.SYNC.DEFER_BLOCKING 0x0" if i % n in (1, 15) else
                          "@!P2 HMMA.16816.F32.BF16 R12, R4, R70, R12" if i % n == 3 else
                          weights if i % n == 5 else copy)

    ins("MOV R1, c[0x0][0x28]")
    for j, copy in enumerate(copies):
        out.append(f".L_x_1{j}:")
        for _ in range(5):
            ins("CS2R R12, SRZ")                                       # part: 5 + 1 (branch) outside the step
        loop(f".L_x_2{j}", (20 + 2 * j) * unroll, step(copy, 20 + 2 * j))
        ins(f"@!P1 BRA `(.L_x_1{j})")
    loop(".L_x_3", 9, lambda i: "FADD R3, R3, R4", line=300)            # patch
    loop(".L_x_4", 30, lambda i: {7: "STG.E.U16 desc[UR4][R6.64], R5", 2: "@P1 HMMA.16816.F32.BF16 R8, R4, R2, R8",
                                  4: "LDG.E.U16 R9, desc[UR4][R2.64]"}.get(i, "FFMA R4, R4, R5, R6"))  # a TC depthwise
    if pairs:
        out.append(".L_x_5:")
        for i in range(20):
            ins({7: "STG.E.STRONG.GPU desc[UR4][R6.64+0x10], R5", 2: "HMMA.16816.F32.BF16 R8, R4, R2, R8"}
                .get(i, "FADD R4, R4, R5"))
        loop(".L_x_6", 5, lambda i: "IADD3 R3, R3, R4")                 # the wrap: a loop without stores
        ins("@!P0 BRA `(.L_x_5)")                                       # 20 + 5 + 1 = 26
    ins("EXIT")
    ins("BRA.DIV UR4, `(.L_x_2)")                                        # fallback: not a loop
    name = "_ZN4moce12grouped_conv4_GLOBAL__N_15pwdw_fwd_kernelI13__nv_bfloat16Li3ELi0EEEvNS0_10PwdwParamsEiii"
    return f"\n//--------------------- .text.{name} ----\n" + "\n".join(out) + "\n"


def _roles(**kw):
    ins, labels = pwdw.parse(_listing(**kw).split(".text.", 1)[1])
    return pwdw.roles(ins, labels, ["pwdw_tile.cuh:300"])


def test_pwdw_reader_finds_step_part_patch_and_dw_loops():
    assert _roles() == {"step": 20, "part": 6, "patch": 9, "dw": 30}
    ins, labels = pwdw.parse(_listing().split(".text.", 1)[1])
    try:
        pwdw.roles(ins, labels, ["pwdw_tile.cuh:301"])                   # no patch loop at that line
    except ValueError:
        pass
    else:
        raise AssertionError("a missing patch loop must be an error")


def test_pwdw_reader_counts_per_step_and_prefers_the_pair_epilogue():
    # a step loop unrolled twice holds two steps: 40 instructions, 20 per step; the part loop's own
    # instructions are unchanged
    assert _roles(unroll=2) == {"step": 20, "part": 6, "patch": 9, "dw": 30}
    # the epilogue storing 32-bit pairs is the one the benchmark shapes take; the single-element one
    # (odd W) is reported beside it
    assert _roles(pairs=True) == {"step": 20, "part": 6, "patch": 9, "dw": 26, "dw_single": 30}


def test_pwdw_reader_tells_the_staging_ways_apart():
    # x by 16-byte cp.async (the benchmark shapes), by 8- or 4-byte cp.async beside the weights' 16-byte
    # copies (W % 8 == 4, W % 4 == 2), element-wise (odd W): the first is the step, the others are
    # reported beside it, each by its own loop
    copies = ["LDGSTS.E.BYPASS.128 [R9+0x200], desc[UR4][R4.64], P0", "@P4 LDGSTS.E.64 [R9], desc[UR4][R4.64], P0",
              "LDGSTS.E [R9+0x80], desc[UR4][R4.64], P2", "LDG.E.U16 R8, desc[UR4][R2.64]"]
    r = _roles(copies=copies)
    assert r == {"step": 20, "part": 6, "patch": 9, "dw": 30, "step_quads": 22, "step_pairs": 24,
                 "step_elementwise": 26}
    assert set(_roles(copies=copies[:1] + copies[2:3])) == {"step", "part", "patch", "dw", "step_pairs"}
    with pytest.raises(ValueError, match="one MMA step loop of each kind"):
        _roles(copies=copies[1:2] + copies[1:2])                        # two loops of one kind
    row = pwdw.per_output(r, pwdw.Case("c", cin=40, cout=100, k=3, mode=0), 2)
    # the fallbacks' totals differ from the step's by (their step - the step) x trips per output
    extra = 256 * 9 * 2 / (100 * 256)
    for k, d in (("total_quads", 2), ("total_pairs", 4), ("total_elementwise", 6)):
        assert abs(row[k] - row["total"] - d * extra) < 0.11, k


def test_pwdw_per_output_weights_loops_by_trip_counts():
    r = {"step": 20, "part": 6, "patch": 9, "dw": 30}
    case = pwdw.Case("c", cin=40, cout=100, k=3, mode=0)                # 2 channel blocks of 64, 3 parts x 3 K steps
    assert (pwdw.parts(3), pwdw.parts(7)) == (3, 4)                     # windows of 10 and 14 rows x 3 tiles
    row = pwdw.per_output(r, case, 2)
    # the patch runs in the tiles at the image's edge: at 128 x 128 and k = 3, all but 14 of 16 tile rows
    # x 2 of 4 tile columns
    assert pwdw.edge_fraction(3) == 1 - (14 * 2) / (16 * 4)
    assert pwdw.edge_fraction(3, H=8, W=32) == 1.0
    lanes = 20 * 256 * 9 * 2 + 6 * 256 * 3 * 2 + 9 * 256 * 8 * 2 * pwdw.edge_fraction(3) + 30 * 32 * 100
    assert abs(row["total"] - round(lanes / (100 * 256), 1)) < 0.11
    budget = 2 * (40 + 100) / 100 / pwdw.COPY_BW * pwdw.ISSUE_RATE
    assert row["ceiling"] == round(min(budget / (lanes / (100 * 256)), 1.0), 2)
