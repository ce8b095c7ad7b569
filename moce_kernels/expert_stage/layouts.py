"""Named layouts of the per-expert meta tables: the one definition Python, Triton and C++ share.

The grouped kernels of the expert stage (and of the plain pointwise->depthwise ops, a group of one)
take an int64 table ``meta`` of ``(E, META_ROW_WIDTH)``: row e holds expert e's channel counts,
offsets into the packed buffers and row strides, built on the host from host-known sizes. Each
kernel has its own table, named here by an ``IntEnum`` whose members are the column indices; in a
table a column means one thing. The driver builds rows with :func:`meta_row`; the Triton kernels
read the columns through ``tl.constexpr`` copies of these enums; the C++ kernels through the header
this module generates:

    python -m moce_kernels.expert_stage.layouts --header > csrc/common/expert_stage_meta.h

(``tests/test_expert_stage_layouts.py`` regenerates it and compares).
"""
from __future__ import annotations

import argparse
import sys
import textwrap
from enum import IntEnum
from typing import Dict, List, Tuple, Type

META_ROW_WIDTH = 16
"""int64 columns of every meta row (the unused tail is zero)."""


class PwDwCol(IntEnum):
    """Grouped fused pointwise->depthwise, forward and backward core: ``out = dw(pw(src))``.

    Row n of the group reads its source at ``SRC + srow * SRC_ROW_STRIDE`` (``srow`` = n, or the
    image of slot ``perm[n]`` when gathering); output channel c of row n is written at
    ``OUT + (c // OUT_SPLIT) * OUT_SPLIT_STRIDE + n * OUT_ROW_STRIDE + (c % OUT_SPLIT) * H * W``
    (the expert stage splits k and v into separate buffers); the backward writes dL/d(pw output) at
    ``GRAD_PW + n * GRAD_PW_ROW_STRIDE + c * H * W``.
    """
    C_IN = 0                # input channels of the 1x1
    C_OUT = 1               # output channels of the 1x1 (both halves in the gated modes)
    PW_WEIGHT = 2           # offset of the (C_OUT, C_IN) 1x1 weight
    DW_WEIGHT = 3           # offset of the (C_OUT, k, k) depthwise weight (and of its gradient)
    PW_BIAS = 4             # offset of the 1x1 bias
    DW_BIAS = 5             # offset of the depthwise bias (and of its gradient)
    SRC = 6                 # base of the source rows
    SRC_ROW_STRIDE = 7
    OUT = 8                 # base of the output
    OUT_SPLIT = 9           # output channels per output block
    OUT_SPLIT_STRIDE = 10   # distance between output blocks
    OUT_ROW_STRIDE = 11
    GRAD_PW = 12            # backward: base of dL/d(1x1 output)
    GRAD_PW_ROW_STRIDE = 13


class GemmCol(IntEnum):
    """Grouped 1x1: ``Y[n, c] (+)= sum_i W[c, i] X[srow, i] (+ b[c])``.

    The weight element (c, i) is at ``WEIGHT + c * WEIGHT_OUT_STRIDE + i * WEIGHT_IN_STRIDE`` (a
    transposed weight by its strides); the source rows as in ``PwDwCol``; output channel c of row n at
    ``OUT + n * OUT_ROW_STRIDE + c * H * W``.
    """
    C_IN = 0
    C_OUT = 1
    WEIGHT = 2
    WEIGHT_OUT_STRIDE = 3
    WEIGHT_IN_STRIDE = 4
    BIAS = 5
    SRC = 6                 # base of the source rows (as PwDwCol.SRC)
    SRC_ROW_STRIDE = 7
    OUT = 8
    OUT_ROW_STRIDE = 9


class WgradCol(IntEnum):
    """Grouped weight gradient: ``dW[c, i] += sum_{rows n, pixels} G[n, c] X[srow, i]``, ``db[c] += sum G[n, c]``.

    Over the rows n of the expert; dW (C_OUT, C_IN) row-major at ``GRAD_WEIGHT``, db at ``GRAD_BIAS``.
    """
    C_OUT = 0
    C_IN = 1
    GRAD_WEIGHT = 2
    G = 3                   # base of the output gradient rows
    G_ROW_STRIDE = 4
    X = 5                   # base of the input rows
    X_ROW_STRIDE = 6
    GRAD_BIAS = 7


class EpilogueCol(IntEnum):
    """Expert epilogue: ``out = x + proj2((proj_out(attn) + proj_out_bias) * silu(proj1(shared)))``.

    Offsets into the packed weights, and the base of the expert's attention rows (``r * H * W`` each).
    """
    RANK = 0                # r of the expert (0: the expert is idle in this step)
    PROJ_OUT = 1
    PROJ_OUT_BIAS = 2
    PROJ1 = 3
    PROJ2 = 4
    ATTN = 5


class PwDwMode(IntEnum):
    """What the grouped pointwise->depthwise forward kernel writes."""
    PLAIN = 0               # dw(pw(src)) (+ biases)
    GATED = 1               # gelu(a) * b of the two channel halves a, b
    GATED_BACKWARD = 2      # d(gelu(a) * b)/d(a, b) times the incoming gradient, all C_OUT channels


TABLES: Tuple[Type[IntEnum], ...] = (PwDwCol, GemmCol, WgradCol, EpilogueCol)


_COLUMNS: Dict[Type[IntEnum], Tuple[Tuple[str, int], ...]] = {t: tuple((c.name, int(c)) for c in t) for t in TABLES}
"""Per table, its (column name, index) pairs."""
_NAMES: Dict[Type[IntEnum], frozenset] = {t: frozenset(c.name for c in t) for t in TABLES}


def meta_row(table: Type[IntEnum], **columns: int) -> Tuple[int, ...]:
    """One meta row of ``table``, every column given by name (``meta_row(GemmCol, C_IN=4, ...)``)."""
    names = _NAMES[table]
    if columns.keys() != names:
        missing, extra = sorted(names - set(columns)), sorted(set(columns) - names)
        raise ValueError(f"{table.__name__} row: missing columns {missing}, unknown columns {extra}")
    row = [0] * META_ROW_WIDTH
    for name, i in _COLUMNS[table]:
        row[i] = int(columns[name])
    return tuple(row)


def _snake(name: str) -> str:
    return "".join("_" + ch.lower() if ch.isupper() and i else ch.lower() for i, ch in enumerate(name))


def cpp_header() -> str:
    """The C++ header with every table and mode of this module (``namespace moce_meta``)."""
    lines: List[str] = [
        "// Generated by `python -m moce_kernels.expert_stage.layouts --header` from",
        "// moce_kernels/expert_stage/layouts.py: do not edit (tests/test_expert_stage_layouts.py compares).",
        "// Column indices of the per-expert meta tables of the grouped kernels, and the modes of the",
        "// fused pointwise->depthwise forward; meta row e of a table starts at meta + e * kRowWidth.",
        "#pragma once",
        "",
        "namespace moce_meta {",
        "",
        f"constexpr int kRowWidth = {META_ROW_WIDTH};",
    ]
    for enum in TABLES + (PwDwMode,):
        summary = enum.__doc__.splitlines()[0].replace("``", "")
        members = ", ".join(f"{m.name}\0=\0{int(m)}" for m in enum)  # \0: keep "NAME = value" on one line
        lines += ["", f"// {enum.__name__}: {summary}", f"namespace {_snake(enum.__name__)} {{"]
        lines += [line.replace("\0", " ") for line in
                  textwrap.wrap(f"enum : int {{ {members} }};", width=110, subsequent_indent=" " * 13)]
        lines += [f"}}  // namespace {_snake(enum.__name__)}"]
    lines += ["", "}  // namespace moce_meta", ""]
    return "\n".join(lines)


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--header", action="store_true", help="print the C++ header")
    args = parser.parse_args(argv)
    if not args.header:
        parser.print_help()
        return 2
    sys.stdout.write(cpp_header())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
