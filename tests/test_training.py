"""Drop-in training: the authors' training loop runs unchanged and follows their trajectory step for
step (``official_train_steps.pt``, made with their code: see ../shared/reference/README.md)."""
import os

import pytest
import torch
import torch.nn.functional as F

from moce_kernels import MoCEIR
from moce_kernels.model.moe import ExpertUsage, _NoGradForUnusedExperts

# AdamW divides each gradient by the root of its running square: where a gradient is ~0 (float noise of
# 1e-9 either way), the step can come out anywhere in [-lr, lr], so the models may part by up to about two
# learning-rate steps on such parameters. The bound below is a small fraction of one step (1e-5 at lr 2e-4);
# measured on this data: 8.1e-7 for the worst parameter after three steps, 7.5e-9 for the unused experts'
# (1.3e-4 for those before their gradients became None).
USED_TOL_FRACTION_OF_LR = 0.05


def _train(data, steps=None):
    torch.manual_seed(0)
    model = MoCEIR(**data["config"], routing_noise="never")  # the data sampled the routing noise as zeros
    model.load_state_dict(data["init"])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=data["lr"])
    none_grads, losses = [], []
    for degraded, clean, de_id in data["batches"][:steps]:
        opt.zero_grad()
        restored = model(degraded, de_id)  # the authors' call: net(degrad_patch, de_id)
        loss = F.l1_loss(restored, clean) + data["balance_loss_weight"] * model.total_loss
        loss.backward()
        none_grads.append(sorted(n for n, p in model.named_parameters() if p.grad is None))
        losses.append(loss.item())
        opt.step()
    return model, none_grads, losses


@pytest.fixture(scope="module")
def steps_data(reference_dir):
    return torch.load(os.path.join(reference_dir, "official_train_steps.pt"))


def test_authors_training_steps(steps_data):
    model, none_grads, losses = _train(steps_data)
    assert none_grads == [sorted(u) for u in steps_data["unused"]], "grad None exactly where the authors' is"
    assert losses == pytest.approx(steps_data["losses"], rel=1e-5, abs=1e-6)
    unused_ever = set().union(*steps_data["unused"])
    lr = steps_data["lr"]
    for name, got in model.state_dict().items():
        want = steps_data["final"][name]
        err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
        if name in unused_ever:
            assert err <= 1e-6, f"{name}: {err:.2e} from the authors' after 3 steps (an expert left unused)"
        else:
            assert err <= USED_TOL_FRACTION_OF_LR * lr, f"{name}: {err:.2e} from the authors' after 3 steps"


def test_unused_experts_keep_accumulated_grads(steps_data):
    """Gradient accumulation: an expert used in the first micro-batch but not the second keeps the first's
    gradient (the authors' model does not touch it), and the counts reach the host once per backward."""
    torch.manual_seed(0)
    model = MoCEIR(**steps_data["config"], routing_noise="never")
    model.load_state_dict(steps_data["init"])
    model.train()
    reads = []
    real_read = ExpertUsage._read_counts
    ExpertUsage._read_counts = lambda self: reads.append(1) or real_read(self)
    try:
        degraded, clean, de_id = steps_data["batches"][0]
        first = {}
        for i, (x, y) in enumerate(((degraded[:1], clean[:1]), (degraded[1:], clean[1:]))):
            F.l1_loss(model(x, de_id[i:i + 1]), y).backward()
            if i == 0:
                first = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    finally:
        ExpertUsage._read_counts = real_read
    assert len(reads) == 2, "one host read of the routing counts per backward"
    kept = [n for n, p in model.named_parameters() if ".experts." in n and n in first
            and torch.equal(p.grad, first[n])]
    assert kept, "some expert used only by the first image keeps exactly its gradient"
    untouched = [n for n, p in model.named_parameters() if p.grad is None]
    assert untouched and all(".experts." in n for n in untouched)


def test_forward_accepts_and_ignores_labels():
    model = MoCEIR(dim=8, num_blocks=[1, 1, 1, 1], num_dec_blocks=[1, 1, 1]).eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x, torch.tensor([0, 3])), model(x))


def test_eval_and_no_grad_record_no_usage():
    model = MoCEIR(dim=8, num_blocks=[1, 1, 1, 1], num_dec_blocks=[1, 1, 1])
    seen = []
    for a in model.adapters():
        a.register_forward_pre_hook(lambda m, args: seen.append(m.usage))
    with torch.no_grad():
        model.eval()(torch.rand(1, 3, 16, 16))
    assert seen and all(u is None for u in seen)


def test_func_grad_through_the_unused_expert_gate():
    """``torch.func.grad`` through the gate that gives unused experts ``grad None``: the used experts'
    gradients are autograd's, the unused expert's are zeros (torch.func fills a None gradient with zeros)."""
    num_experts, per_expert = 3, 2
    indices = torch.tensor([0, 2, 0])  # expert 1 gets no image
    weights = [torch.randn(4) if i % per_expert == 0 else torch.randn(2, 3) for i in range(num_experts * per_expert)]
    coeffs = [torch.randn_like(w) for w in weights]

    def loss(ws):
        usage = ExpertUsage()
        slot = usage.record(torch.bincount(indices, minlength=num_experts))
        out = _NoGradForUnusedExperts.apply(usage, slot, per_expert, *ws)
        return sum((o * c).sum() for o, c in zip(out, coeffs))

    got = torch.func.grad(loss)(weights)
    leaves = [w.clone().requires_grad_() for w in weights]
    loss(leaves).backward()
    for i, (g, leaf) in enumerate(zip(got, leaves)):
        if i // per_expert == 1:
            assert leaf.grad is None and torch.equal(g, torch.zeros_like(g)), f"tensor {i} of the unused expert"
        else:
            assert torch.equal(g, leaf.grad) and torch.equal(g, coeffs[i]), f"tensor {i} of a used expert"


def test_func_grad_over_functional_call_in_training():
    """The whole model under ``torch.func.grad(functional_call)`` in training: autograd's gradients, zeros for
    the experts autograd leaves at None."""
    model = MoCEIR(dim=8, num_blocks=[1, 1, 1, 1], num_dec_blocks=[1, 1, 1], heads=[1, 1, 1, 1],
                   num_refinement_blocks=1, topk=1, routing_noise="never").train()
    x, y = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)

    def loss(params):
        out = torch.func.functional_call(model, params, (x,))
        return F.l1_loss(out, y) + 0.01 * model.total_loss

    got = torch.func.grad(loss)({n: p.detach() for n, p in model.named_parameters()})
    loss(dict(model.named_parameters())).backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert unused, "top-1 routing of two images leaves some expert unused"
    for n, p in model.named_parameters():
        want = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(got[n], want, msg=lambda m: f"{n}: {m}")
