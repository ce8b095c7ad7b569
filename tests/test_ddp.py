"""DistributedDataParallel: two gloo processes on the CPU follow one process's AdamW trajectory.

What "the single-process trajectory" means here. DDP runs each rank's forward on its share of the global
batch, each rank computes its own loss, and the reducer averages the ranks' gradients. The L1 term is a
mean over images, so with equal shares the average of the ranks' L1 losses is the L1 loss of the
concatenated batch, and since training-mode outputs are per image (no batch statistics; routing noise
off, as in test_training.py), DDP without the auxiliary loss must follow one process on the concatenated
batch. The auxiliary loss is a coefficient of variation over the batch (not linear in it), so a rank's
loss is not its share of the concatenated batch's loss (as with BatchNorm without SyncBatchNorm): there
the single-process reference is one process that runs each rank's share as a micro-batch and averages
their losses, the loss DDP actually optimises (measured: DDP is 4.6e-3 to 5.4e-3 from one forward of the
concatenated batch with the auxiliary loss after three steps at lr 1e-3, so that is no reference).
Gradient accumulation (``no_sync`` on the first of two micro-batches per rank) is one process over four
micro-batches. In every case an expert has ``grad None`` after a step exactly when no micro-batch routed
an image to it, so AdamW leaves it alone.

Tolerance: the two sides differ only in float summation order (the all-reduce sums the ranks' gradients;
one process accumulates them), but AdamW divides each gradient by the root of its running square, so where
a gradient is ~0 the step can land anywhere in [-lr, lr]; as in test_training.py the bound is a small
fraction of one step (measured over four draws: 0 with the auxiliary loss, up to 1.0e-6 without it,
1.2e-7 accumulating). The experts left alone must be bitwise untouched, and which gradients are ``None``
must agree exactly at every step.
"""
import contextlib
import multiprocessing
import os
import traceback
from datetime import timedelta
from typing import Dict, List

import pytest
import torch
import torch.nn.functional as F

from moce_kernels import MoCEIR

CONFIG = dict(dim=8, num_blocks=[1, 1, 1, 1], num_dec_blocks=[1, 1, 1], heads=[1, 1, 1, 1], num_refinement_blocks=1,
              topk=1, routing_noise="never")
WORLD, PER_RANK, SIZE, STEPS, LR = 2, 2, 16, 3, 1e-3
BALANCE = 0.01  # the authors' weight of the auxiliary loss
TOL = 0.05 * LR
TIMEOUT_S = 180


def _train(model, steps, balance: float, shares: int):
    """AdamW steps on ``steps`` (a list of (x, y) batches), each batch run as ``shares`` micro-batches whose
    gradients accumulate (their losses averaged; for a DDP model, all but the last under ``no_sync``).
    Returns the state and, per step, the names with ``grad None``."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    inner = getattr(model, "module", model)
    nones: List[List[str]] = []
    for x, y in steps:
        opt.zero_grad()
        parts = list(zip(x.chunk(shares), y.chunk(shares)))
        for i, (xs, ys) in enumerate(parts):
            last = i == len(parts) - 1
            with contextlib.nullcontext() if last or model is inner else model.no_sync():
                ((F.l1_loss(model(xs), ys) + balance * inner.total_loss) / len(parts)).backward()
        nones.append(sorted(n.removeprefix("module.") for n, p in model.named_parameters() if p.grad is None))
        opt.step()
    return {k.removeprefix("module."): v.detach().clone() for k, v in model.state_dict().items()}, nones


def _worker(rank: int, job_path: str, out_dir: str) -> None:
    """One DDP rank: every case of the job on this rank's share; results to ``out_dir/rank{rank}.pt``."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    job = torch.load(job_path)
    torch.distributed.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank,
                                         world_size=WORLD, timeout=timedelta(seconds=60))
    results = {}
    try:
        mine = [(x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]) for x, y in job["steps"]]
        for name, ddp_kwargs, balance, shares in job["cases"]:
            model = MoCEIR(**CONFIG)
            model.load_state_dict(job["init"])
            ddp = DDP(model.train(), **ddp_kwargs)
            try:
                results[name] = ("ok",) + _train(ddp, mine, balance, shares)
            except RuntimeError as e:
                results[name] = ("error", str(e))
    except Exception:
        results["worker"] = ("crash", traceback.format_exc())
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        torch.distributed.destroy_process_group()


def _run_ranks(job: dict, tmp_path) -> List[Dict[str, tuple]]:
    torch.save(job, tmp_path / "job.pt")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, str(tmp_path / "job.pt"), str(tmp_path))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    assert not hung, f"DDP ranks still running after {TIMEOUT_S} s"
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for r, res in enumerate(results):
        assert "worker" not in res, f"rank {r} failed:\n{res['worker'][1]}"
    return results


def _expert_names(names) -> set:
    return {n for n in names if ".experts." in n}


def _draw_job():
    """A model and batches where, at some step, an expert is used by one rank's share only and another by
    neither (redrawn until so: with top-1 routing of two images per share it is the usual case)."""
    for _ in range(20):
        init = MoCEIR(**CONFIG).state_dict()
        steps = [(torch.rand(WORLD * PER_RANK, 3, SIZE, SIZE), torch.rand(WORLD * PER_RANK, 3, SIZE, SIZE))
                 for _ in range(STEPS)]
        shares, experts = [], None
        for x, _ in steps:
            used = []
            for xs in x.chunk(WORLD):
                model = MoCEIR(**CONFIG)
                model.load_state_dict(init)
                model.train()(xs).mean().backward()
                experts = _expert_names(n for n, _ in model.named_parameters())
                used.append(_expert_names(n for n, p in model.named_parameters() if p.grad is not None))
            shares.append(used)
        one_only = any(u[0] ^ u[1] for u in shares)
        neither = any(set().union(*u) < experts for u in shares)
        if one_only and neither:
            return init, steps
    pytest.fail("no draw routed an expert to one share only and another to neither")


def _reference(init, steps, balance: float, shares: int):
    model = MoCEIR(**CONFIG)
    model.load_state_dict(init)
    return _train(model.train(), steps, balance, shares)


def _assert_same_trajectory(got, want, init, label: str) -> None:
    (state, nones), (want_state, want_nones) = got, want
    assert nones == want_nones, f"{label}: grad None on other parameters than one process's"
    assert any(want_nones), "the draw leaves some expert unused"
    never = set.intersection(*map(set, want_nones))
    for name, w in want_state.items():
        g = state[name]
        if name in never:
            assert torch.equal(g, init[name]), f"{label}: {name} is used by no share yet moved"
        elif w.numel():
            err = (g.double() - w.double()).abs().max().item()
            assert err <= TOL, f"{label}: {name} is {err:.2e} from one process after {STEPS} steps"


@pytest.fixture
def one_thread():
    """Single-threaded, as each rank is: on a loaded 2-core machine two intra-op threads spend most of their
    time waiting on each other (a dim-8 training step: 0.1 s of CPU on one thread, 6 s on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_ddp_follows_one_process(tmp_path, one_thread):
    init, steps = _draw_job()
    cases = [("authors", dict(find_unused_parameters=True), BALANCE, 1),
             ("l1_only", dict(find_unused_parameters=True), 0.0, 1),
             ("accumulate", dict(find_unused_parameters=True), BALANCE, 2),
             ("default", {}, BALANCE, 1),
             ("static_graph", dict(static_graph=True), BALANCE, 1)]
    ranks = _run_ranks(dict(init=init, steps=steps, cases=cases), tmp_path)
    references = {"authors": _reference(init, steps, BALANCE, shares=WORLD),
                  "l1_only": _reference(init, steps, 0.0, shares=1),
                  "accumulate": _reference(init, steps, BALANCE, shares=2 * WORLD)}
    for r, res in enumerate(ranks):
        for name, want in references.items():
            status, *got = res[name]
            assert status == "ok", f"rank {r}, {name}: {got[0]}"
            _assert_same_trajectory(got, want, init, f"rank {r}, {name}")
        for name in ("default", "static_graph"):
            status, *got = res[name]
            assert status == "error", f"rank {r}, {name}: trained under a DDP that overwrites None gradients"
            assert "find_unused_parameters=True" in got[0] and "ddp_find_unused_parameters_true" in got[0]
