"""The op census of a forward (moce_kernels.census) and the op budget of issue 16: at most 450 compute ops
per MoCE-IR forward at the dispatcher level in the default eager path (a count, deterministic)."""
import pytest
import torch

from moce_kernels import MoCEIR
from moce_kernels.census import census

OP_BUDGET = 450


@pytest.mark.parametrize("preset", ["MoCE_IR", "MoCE_IR_S"])
def test_op_budget_of_a_forward(preset):
    c = census(MoCEIR.from_preset(preset).eval(), torch.rand(1, 3, 16, 16))
    ours = sum(n for op, n in c.ops.items() if op.startswith("moce::"))
    print(f"{preset}: {c.total_ops} ops ({ours} of ours)\n{c.table()}")
    assert c.total_ops <= OP_BUDGET, f"{c.total_ops} ops per forward (budget {OP_BUDGET}): {c.ops.most_common(12)}"
    # what the fused trunk is made of: 4 ops per encoder / latent / refinement block (28 of them), one
    # LN -> two projections per decoder block (10)
    assert c.ops["moce::channel_attention"] == 28 + 2 * 10
    assert c.ops["moce::layer_norm_pointwise_conv"] == 10
    assert c.ops["moce::moe_experts"] == 10
    assert not any(op.startswith("aten::linalg_vector_norm") or op == "aten::_softmax" for op in c.ops)


def test_census_counts_compute_not_views():
    """Views and bare allocations are not ops; each of our ops counts once; the floor never exceeds the
    bytes moved; a chain of elementwise ops in one module is one call site for the floor."""
    class Chain(torch.nn.Module):
        def forward(self, x):
            y = x.view(-1).reshape(x.shape).transpose(0, 1).transpose(0, 1)  # views only
            return (y * 2 + 1).relu()

    x = torch.rand(4, 8)
    c = census(Chain(), x)
    assert dict(c.ops) == {"aten::mul": 1, "aten::add": 1, "aten::relu": 1}
    assert c.families["other"].bytes == 6 * x.numel() * 4  # each op reads one tensor and writes one
    assert c.families["other"].floor == 2 * x.numel() * 4  # the chain fused: read x, write the result
