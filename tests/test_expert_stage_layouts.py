"""The expert stage's contracts: the meta-table layouts (Python enums, Triton constexprs, the generated C++
header) and the ExpertWeights named tuple."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from moce_kernels import emulation
from moce_kernels.expert_stage import layouts
from moce_kernels.expert_stage.weights import PER_EXPERT, ExpertWeights, flatten, unflatten

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "csrc" / "common" / "expert_stage_meta.h"


def test_committed_header_is_generated_from_the_enums():
    assert HEADER.read_text() == layouts.cpp_header(), (
        f"{HEADER.relative_to(ROOT)} is stale: regenerate it with "
        "`python -m moce_kernels.expert_stage.layouts --header > csrc/common/expert_stage_meta.h`")


def test_header_command_line(capsys):
    assert layouts.main(["--header"]) == 0
    assert capsys.readouterr().out == layouts.cpp_header()


@pytest.mark.parametrize("table", layouts.TABLES, ids=lambda t: t.__name__)
def test_tables_are_dense_and_fit_a_row(table):
    assert sorted(int(c) for c in table) == list(range(len(table))), "columns 0..n-1, each once"
    assert len(table) <= layouts.META_ROW_WIDTH


def test_meta_row_names_every_column():
    row = layouts.meta_row(layouts.EpilogueCol, RANK=3, PROJ_OUT=10, PROJ_OUT_BIAS=19, PROJ1=22, PROJ2=40, ATTN=7)
    assert len(row) == layouts.META_ROW_WIDTH
    assert row[layouts.EpilogueCol.PROJ1] == 22 and row[layouts.EpilogueCol.ATTN] == 7 and row[6:] == (0,) * 10
    with pytest.raises(ValueError, match="missing columns \\['ATTN'\\]"):
        layouts.meta_row(layouts.EpilogueCol, RANK=3, PROJ_OUT=10, PROJ_OUT_BIAS=19, PROJ1=22, PROJ2=40)
    with pytest.raises(ValueError, match="unknown columns \\['BOGUS'\\]"):
        layouts.meta_row(layouts.EpilogueCol, RANK=3, PROJ_OUT=10, PROJ_OUT_BIAS=19, PROJ1=22, PROJ2=40, ATTN=7,
                         BOGUS=1)


def test_triton_constexprs_are_the_enums():
    pytest.importorskip("triton")
    from moce_kernels.triton import expert_conv, expert_stage
    prefixes = {"PD_": layouts.PwDwCol, "MM_": layouts.GemmCol, "WG_": layouts.WgradCol}
    seen = 0
    for mod in (expert_conv, expert_stage):
        for name, value in vars(mod).items():
            table = next((t for p, t in prefixes.items() if name.startswith(p)), None)
            if name.startswith("EP_"):
                table = layouts.EpilogueCol
            if table is not None:
                assert value.value == int(table[name[3:]]), name
                seen += 1
    assert seen == sum(len(t) for t in layouts.TABLES), "every column has its constexpr"
    assert expert_conv.META_ROW.value == layouts.META_ROW_WIDTH


@pytest.mark.skipif(emulation.why_unavailable() is not None,
                    reason=f"CUDA emulation unavailable: {emulation.why_unavailable()}")
def test_cpp_wrappers_take_rows_of_the_row_width():
    """The C++ ops check meta against the header's kRowWidth: a row one column short names the width."""
    emulation.load()
    x, w, y = torch.zeros(2, 3, 4), torch.zeros(3, 3), torch.zeros(2, 3, 4)
    offsets, width = torch.tensor([0, 2]), layouts.META_ROW_WIDTH - 1
    meta = torch.tensor([layouts.meta_row(layouts.GemmCol, C_IN=3, C_OUT=3, WEIGHT=0, WEIGHT_OUT_STRIDE=3,
                                          WEIGHT_IN_STRIDE=1, BIAS=0, SRC=0, SRC_ROW_STRIDE=12, OUT=0,
                                          OUT_ROW_STRIDE=12)[:width]])
    expected = f"meta must be (E, {layouts.META_ROW_WIDTH}), got [1, {width}]"
    with pytest.raises(RuntimeError, match=re.escape(expected)):
        torch.ops.moce_C.grouped_gemm(x, w, None, y, offsets, meta, None, 1, 2, 4, 3, False)


def test_expert_weights_shapes_and_flat_form():
    C, r = 6, 3
    shapes = ExpertWeights.shapes(C, r, 3, 7)
    assert shapes.kv_dw == (2 * r, 1, 7, 7) and shapes.proj2 == (C, r, 1, 1) and len(shapes) == PER_EXPERT == 13
    experts = [ExpertWeights(*(torch.randn(s) for s in ExpertWeights.shapes(C, rank, 3, 7))) for rank in (1, 3)]
    flat = flatten(experts)
    assert len(flat) == 26 and flat[13] is experts[1].proj0
    back = unflatten(flat)
    assert all(a is b for w, v in zip(back, experts) for a, b in zip(w, v))
    assert experts[1].rank == 3
    with pytest.raises(ValueError, match="13 weights"):
        unflatten(flat[:-1])
