"""moce-restore on Ray Data (moce_kernels.ray_restore), on a local Ray runtime with two workers: outputs
bitwise equal to moce-restore's, the same summary, and a worker killed mid-batch (after one output and
half of another) still leaves every file restored once, complete, with no temporary file left.

One Ray runtime serves the whole module (its start-up takes seconds); the model is tiny, the images few
and small."""
import os
import re
import signal
import sys

import cv2
import numpy as np
import pytest
import torch

import ray

from moce_kernels import MoCEIR
from moce_kernels.cli.restore import build_parser, collect_inputs, main, plan_jobs
from moce_kernels.ray_restore import RestoreFiles, remove_partials, restore_on_ray

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def ray_runtime():
    """A local runtime of two CPUs whose workers import this checkout (and this module, by value)."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    MoCEIR.from_preset("MoCE_IR_S", dim=8, num_blocks=[1, 1, 1, 1], num_dec_blocks=[1, 1, 1],
                       num_refinement_blocks=1).save_checkpoint(path)
    return str(path)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Six small images of several kinds (one large enough to be tiled) and one broken file."""
    rng = np.random.default_rng(0)
    src = tmp_path_factory.mktemp("photos")
    images = {"a.png": rng.integers(0, 256, (40, 56, 3), dtype=np.uint8),
              "b16.png": rng.integers(0, 65536, (24, 16, 3), dtype=np.uint16),
              "gray.png": rng.integers(0, 256, (16, 24), dtype=np.uint8),
              "sub/c.jpg": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
              "sub/alpha.tif": rng.integers(0, 256, (16, 24, 4), dtype=np.uint8),
              "sub/d.webp": rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)}
    for name, pixels in images.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(src / name), pixels)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    return src


OPTIONS = ["--recursive", "--tile", "16", "--overlap", "4", "--no-progress"]


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _summary(text):
    """The summary line without its time."""
    line = next(ln for ln in text.splitlines() if ln.startswith("restored "))
    return re.sub(r" in [0-9.]+ s", "", line)


@pytest.fixture(scope="module")
def baseline(photos, ckpt, tmp_path_factory):
    """moce-restore's outputs and summary, one intra-op thread as each Ray worker has."""
    out = tmp_path_factory.mktemp("baseline")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from contextlib import redirect_stdout
        from io import StringIO
        buf = StringIO()
        with redirect_stdout(buf):
            status = main([str(photos), "--ckpt", ckpt, "--out", str(out), "--backend", "reference", *OPTIONS])
    finally:
        torch.set_num_threads(threads)
    assert status == 1  # the broken file
    outputs = _snapshot(out)
    assert len(outputs) == 6
    return outputs, _summary(buf.getvalue())


def test_cli_ray_outputs_bitwise_equal_and_same_summary(photos, ckpt, baseline, tmp_path, capsys):
    out = tmp_path / "ray"
    status = main([str(photos), "--ckpt", ckpt, "--out", str(out), "--backend", "reference", *OPTIONS,
                   "--ray", "--ray-workers", "2"])
    captured = capsys.readouterr()
    assert status == 1
    assert _summary(captured.out) == baseline[1]
    assert baseline[1] == "restored 6 of 7 files (0.00422 megapixels); 1 failed"
    errors = [ln for ln in captured.err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "broken.png" in errors[0]
    got = _snapshot(out)
    assert sorted(got) == sorted(baseline[0])
    for name, data in baseline[0].items():
        assert got[name] == data, f"{name} differs from moce-restore's output"


class DiesOnce(RestoreFiles):
    """The first batch any worker gets: restore its first file, write half of its second file's temporary
    output, then the worker process is killed (SIGKILL: no clean-up runs). ``args.kill_marker``: a file
    created by the one worker that dies."""

    def __init__(self, args):
        super().__init__(args)
        self.marker = args.kill_marker

    def __call__(self, batch):
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return super().__call__(batch)
        ok, _, error = self.restore_one(str(batch["src"][0]), str(batch["dst"][0]))
        assert ok, error
        os.makedirs(os.path.dirname(str(batch["dst"][1])), exist_ok=True)
        with open(f"{batch['dst'][1]}.{os.getpid()}.0123abcd.tmp", "wb") as f:
            f.write(b"half an image")
        os.kill(os.getpid(), signal.SIGKILL)


def _args(photos, ckpt, out, extra=()):
    args = build_parser().parse_intermixed_args([str(photos), "--ckpt", ckpt, "--out", str(out), "--backend",
                                                 "reference", *OPTIONS, *extra])
    plan = plan_jobs(collect_inputs(args.inputs, args.recursive, args.out).files, args.out)
    return args, [(j.src, j.dst) for j in plan.jobs if not j.src.endswith("broken.png")]


def test_killed_worker_leaves_every_file_restored_once(photos, ckpt, baseline, tmp_path):
    out = tmp_path / "ray"
    args, jobs = _args(photos, ckpt, out)
    args.kill_marker = str(tmp_path / "killed")
    summary = restore_on_ray(args, jobs, workers=2, files_per_batch=2, worker_class=DiesOnce)
    assert os.path.exists(args.kill_marker), "no worker was killed"
    assert (summary.done, summary.failed) == (6, [])
    assert abs(summary.megapixels - 4224e-6) < 1e-12  # the six images' pixels
    got = _snapshot(out)
    assert sorted(got) == sorted(baseline[0]), "missing, partial or extra files"
    for name, data in baseline[0].items():
        assert got[name] == data, f"{name} differs from moce-restore's output"


def test_remove_partials_removes_only_temporary_files_of_the_outputs(tmp_path):
    dst = tmp_path / "x.png"
    for name in ("x.png", "x.png.123.0a1b2c3d.tmp", "x.png.tmp", "x.png.12.0a1b2c3.tmp", "y.png.5.0a1b2c3d.tmp",
                 "x.png.7.ffffffff.tmp"):
        (tmp_path / name).write_bytes(b"")
    assert remove_partials([str(dst), str(tmp_path / "missing" / "z.png")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png", "x.png.12.0a1b2c3.tmp", "x.png.tmp",
                                                         "y.png.5.0a1b2c3d.tmp"]


def test_bad_worker_count_and_missing_ray_are_refused_in_one_line(photos, ckpt, tmp_path, capsys, monkeypatch):
    status = main([str(photos), "--ckpt", ckpt, "--out", str(tmp_path / "o"), "--ray", "--ray-workers", "0"])
    assert status == 2 and "--ray-workers must be positive" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray.data", None)  # as where Ray Data is not installed
    status = main([str(photos), "--ckpt", ckpt, "--out", str(tmp_path / "o"), "--ray"])
    err = capsys.readouterr().err
    assert status == 2 and "--ray needs Ray Data" in err and "Traceback" not in err


def test_a_cuda_run_on_a_cluster_without_gpus_fails_every_file_in_one_line(photos, ckpt, tmp_path, capsys):
    status = main([str(photos), "--ckpt", ckpt, "--out", str(tmp_path / "o"), *OPTIONS, "--device", "cuda",
                   "--ray"])
    captured = capsys.readouterr()
    assert status == 1 and "restored 0 of 7 files" in captured.out and "7 failed" in captured.out
    errors = [ln for ln in captured.err.splitlines() if ln.startswith("error:")]
    assert errors == ["error: --device cuda: the Ray cluster has no GPU"]
    assert not (tmp_path / "o").exists()
