"""moce-restore: files, folders and globs in (symbolic links under their own names); outputs that
never overwrite inputs or existing files, never outside --out; formats checked before running;
per-file errors and lines."""
import os
import re
import sys

import cv2
import numpy as np
import pytest
import torch

import moce_kernels
from moce_kernels import MoCEIR
import moce_kernels.cli.restore as restore_cli
from moce_kernels.cli.restore import Job, RestoreOptions, main, model_restorer, plan_jobs, restore_file
from moce_kernels.cli._common import UsageError
from moce_kernels.imageio import LUMA, read_image

from test_restore import Pointwise


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    MoCEIR(dim=8, num_blocks=[1, 1, 1, 1]).save_checkpoint(path)
    return str(path)


def _write(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), pixels)


def _snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_folder_run_keeps_structure_reports_bad_files_and_fails_at_the_end(tmp_path, ckpt, capsys):
    rng = np.random.default_rng(0)
    src = tmp_path / "photos"
    _write(src / "a.png", rng.integers(0, 65536, (24, 40, 3), dtype=np.uint16))
    _write(src / "trip" / "b.jpg", rng.integers(0, 256, (16, 24, 3), dtype=np.uint8))
    (src / "trip" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    (src / "empty.tif").write_bytes(b"")
    before = _snapshot(src)
    out = tmp_path / "restored"
    status = main([str(src), "--recursive", "--ckpt", ckpt, "--out", str(out), str(tmp_path / "nope.png")])
    captured = capsys.readouterr()
    assert status == 1
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 3 and all(name in captured.err for name in ("broken.png", "empty.tif", "nope.png"))
    assert "Traceback" not in captured.err
    assert "restored 2 of 5 files" in captured.out
    assert _snapshot(src) == before, "inputs untouched"
    a, b = read_image(out / "a.png"), read_image(out / "trip" / "b.jpg")  # below the one input folder
    assert a.dtype == np.uint16 and a.color.shape == (24, 40, 3)
    assert b.dtype == np.uint8 and b.color.shape == (16, 24, 3)


def test_never_overwrites_an_input(tmp_path, ckpt, capsys):
    src = tmp_path / "in"
    _write(src / "x.png", np.full((16, 16, 3), 100, np.uint8))
    before = _snapshot(src)
    assert main([str(src), "--ckpt", ckpt, "--out", str(src)]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert _snapshot(src) == before
    assert main([str(src / "x.png"), "--ckpt", ckpt, "--out", str(src), "--suffix", "_restored"]) == 0
    assert _snapshot(src)[src / "x.png"] == before[src / "x.png"]
    assert (src / "x_restored.png").exists()


def test_same_names_from_different_folders_cannot_clobber(tmp_path):
    for folder in ("a", "b"):
        _write(tmp_path / folder / "x.png", np.zeros((8, 8, 3), np.uint8))
    _write(tmp_path / "a" / "x.jpg", np.zeros((8, 8, 3), np.uint8))
    inputs = [(str(tmp_path / f / "x.png"), str(tmp_path / f)) for f in ("a", "b")]
    jobs = plan_jobs(inputs, str(tmp_path / "out")).jobs
    assert sorted(j.dst for j in jobs) == [str(tmp_path / "out" / f / "x.png") for f in ("a", "b")]
    with pytest.raises(UsageError, match="would both be written"):
        plan_jobs([(str(tmp_path / "a" / "x.png"), str(tmp_path / "a")),
                   (str(tmp_path / "a" / "x.jpg"), str(tmp_path / "a"))], str(tmp_path / "out"), ext="png")
    same = plan_jobs(inputs + [(str(tmp_path / "a" / ".." / "a" / "x.png"), str(tmp_path / "a"))], str(tmp_path / "o"))
    assert len(same.jobs) == 2, "one file given twice is restored once"


def test_16_bit_gray_keeps_the_values_the_model_produced(tmp_path):
    torch.manual_seed(5)
    rng = np.random.default_rng(5)
    gray = rng.integers(0, 65536, (30, 45), dtype=np.uint16)
    _write(tmp_path / "g.tif", gray)
    model = Pointwise()
    job = Job(str(tmp_path / "g.tif"), str(tmp_path / "out" / "g.tif"))
    options = RestoreOptions(tile=16, overlap=4)
    restore_file(model_restorer(model, options), job, options)
    x = torch.from_numpy(gray.astype(np.float32) / 65535).expand(1, 3, 30, 45)
    with torch.no_grad():
        y = model(x)[0].double().clamp(0, 1).numpy()
    expected = np.rint((LUMA[0] * y[0] + LUMA[1] * y[1] + LUMA[2] * y[2]) * 65535)
    back = read_image(tmp_path / "out" / "g.tif")
    assert back.gray and back.dtype == np.uint16 and np.array_equal(back.color, expected)


def test_optimize_flag(tmp_path, ckpt, capsys, monkeypatch):
    _write(tmp_path / "x.png", np.zeros((16, 16, 3), np.uint8))
    args = [str(tmp_path / "x.png"), "--ckpt", ckpt, "--out", str(tmp_path / "out"), "--optimize"]
    monkeypatch.delattr(moce_kernels, "optimize", raising=False)
    assert main(args) == 2
    assert "moce_kernels.optimize" in capsys.readouterr().err
    seen = []
    monkeypatch.setattr(moce_kernels, "optimize", lambda m: seen.append(m) or m, raising=False)
    assert main(args) == 0 and len(seen) == 1


def test_bad_options_are_refused_in_one_line(tmp_path, ckpt, capsys):
    _write(tmp_path / "x.png", np.zeros((16, 16, 3), np.uint8))
    base = [str(tmp_path / "x.png"), "--out", str(tmp_path / "out")]
    for extra, match in [(["--ckpt", str(tmp_path / "none.ckpt")], "not found"),
                         (["--ckpt", ckpt, "--dtype", "bf16", "--device", "cpu"], "needs a GPU"),
                         (["--ckpt", ckpt, "--backend", "nope"], "nope"),
                         (["--ckpt", ckpt, "--tile", "100"], "multiple of 8"),
                         (["--ckpt", ckpt, "--tile", "64", "--overlap", "40"], "--overlap")]:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert match in err and len(err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------- symbolic links, existing outputs
def _tree(folder, skip=None):
    """Every entry below ``folder`` (not ``skip``): file bytes, or the target of a link."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        out[p] = ("link", os.readlink(p)) if p.is_symlink() else p.read_bytes() if p.is_file() else "dir"
    return out


def test_symlinked_inputs_are_written_below_out_under_their_names(tmp_path, ckpt, capsys):
    rng = np.random.default_rng(1)
    _write(tmp_path / "src" / "real" / "a.png", rng.integers(0, 256, (16, 24, 3), dtype=np.uint8))
    _write(tmp_path / "src" / "real" / "b.png", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    _write(tmp_path / "far" / "c.png", rng.integers(0, 256, (8, 16, 3), dtype=np.uint8))
    links = tmp_path / "src" / "links"
    links.mkdir()
    for name, target in [("a1.png", "../real/a.png"), ("a2.png", "../real/a.png"), ("b.png", "../real/b.png"),
                         ("c.png", str(tmp_path / "far" / "c.png"))]:
        os.symlink(target, links / name)
    _write(tmp_path / "o" / "real" / "a.png", np.zeros((4, 4, 3), np.uint8))  # unrelated, beside --out
    out = tmp_path / "o" / "out"
    before = _tree(tmp_path)
    status = main([str(links / n) for n in ("a1.png", "a2.png", "b.png", "c.png")]
                  + ["--ckpt", ckpt, "--out", str(out)])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "restored 4 of 4 files" in captured.out
    assert _tree(tmp_path, skip=out) == before, "nothing written outside --out, no link or input touched"
    assert sorted(p.name for p in out.iterdir()) == ["a1.png", "a2.png", "b.png", "c.png"]
    assert not any(p.is_symlink() for p in out.iterdir())
    assert (out / "a1.png").read_bytes() == (out / "a2.png").read_bytes()
    assert read_image(out / "c.png").color.shape == (8, 16, 3)


def test_existing_outputs_are_skipped_unless_overwrite(tmp_path, ckpt, capsys):
    src, out, outside = tmp_path / "in", tmp_path / "out", tmp_path / "outside"
    for name in ("x.png", "y.png", "z.png", "w.png"):
        _write(src / name, np.full((16, 16, 3), 100, np.uint8))
    _write(out / "x.png", np.zeros((4, 4, 3), np.uint8))  # a file of the user's at an output path
    _write(outside / "target.png", np.zeros((4, 4, 3), np.uint8))
    os.symlink(outside / "target.png", out / "y.png")  # a link at an output path, to outside --out
    os.symlink(outside / "missing.png", out / "z.png")  # a dangling one
    kept, target = (out / "x.png").read_bytes(), (outside / "target.png").read_bytes()
    status = main([str(src), "--ckpt", ckpt, "--out", str(out)])
    captured = capsys.readouterr()
    assert status == 0, "skipping is not a failure"
    skipped = [line for line in captured.err.splitlines() if line.startswith("skipped:")]
    assert len(skipped) == 3 and all(n in captured.err for n in ("x.png", "y.png", "z.png")), captured.err
    assert "--overwrite" in skipped[0]
    assert "restored 1 of 4 files" in captured.out and "3 skipped" in captured.out
    assert (out / "x.png").read_bytes() == kept and os.readlink(out / "y.png") == str(outside / "target.png")
    assert (out / "z.png").is_symlink() and (out / "w.png").is_file()
    assert main([str(src), "--ckpt", ckpt, "--out", str(out), "--overwrite"]) == 0
    assert "restored 4 of 4 files" in capsys.readouterr().out
    assert read_image(out / "x.png").color.shape == (16, 16, 3)
    for name in ("y.png", "z.png"):
        assert not (out / name).is_symlink() and read_image(out / name).color.shape == (16, 16, 3)
    assert (outside / "target.png").read_bytes() == target and sorted(os.listdir(outside)) == ["target.png"]


def test_output_that_appears_during_the_run_is_not_replaced(tmp_path, ckpt, capsys, monkeypatch):
    _write(tmp_path / "in" / "x.png", np.full((16, 16, 3), 100, np.uint8))
    out = tmp_path / "out"
    real_restore = restore_cli.restore

    def restore_while_someone_writes(*args, **kwargs):
        _write(out / "x.png", np.zeros((4, 4, 3), np.uint8))
        return real_restore(*args, **kwargs)
    monkeypatch.setattr(restore_cli, "restore", restore_while_someone_writes)
    assert main([str(tmp_path / "in"), "--ckpt", ckpt, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "skipped:" in captured.err and "1 skipped" in captured.out
    assert read_image(out / "x.png").color.shape == (4, 4, 3)
    assert sorted(os.listdir(out)) == ["x.png"], "no temporary file left"


@pytest.mark.parametrize("how", ["folder", "glob"])
def test_recursive_follows_folder_links_but_not_loops_and_reports_dangling_links(tmp_path, ckpt, capsys, how):
    src, out = tmp_path / "src", tmp_path / "out"
    _write(src / "a.png", np.full((16, 16, 3), 50, np.uint8))
    _write(tmp_path / "far" / "c.png", np.full((8, 8, 3), 50, np.uint8))
    os.symlink(tmp_path / "far", src / "sub")  # a linked folder: followed
    (src / "deep").mkdir()
    os.symlink("..", src / "deep" / "up")  # a loop back to src
    os.symlink("..", src / "deep" / "up2")
    os.symlink("nowhere.png", src / "dead.png")  # target missing
    os.symlink("loop2.png", src / "loop1.png")
    os.symlink("loop1.png", src / "loop2.png")
    spec = str(src) if how == "folder" else str(src / "**" / "*.png")
    status = main([spec, "--recursive", "--ckpt", ckpt, "--out", str(out)])
    captured = capsys.readouterr()
    assert status == 1
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 3, captured.err
    assert "dead.png: symbolic link to a missing file" in captured.err
    assert "loop1.png: symbolic link loop" in captured.err and "loop2.png: symbolic link loop" in captured.err
    assert "restored 2 of 5 files" in captured.out and "3 failed" in captured.out
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == ["a.png", os.path.join("sub", "c.png")]


def test_output_folder_linked_outside_out_is_refused(tmp_path, ckpt, capsys):
    src, out, outside = tmp_path / "src", tmp_path / "out", tmp_path / "outside"
    _write(src / "a.png", np.full((16, 16, 3), 50, np.uint8))
    _write(src / "sub" / "b.png", np.full((16, 16, 3), 50, np.uint8))
    outside.mkdir()
    out.mkdir()
    os.symlink(outside, out / "sub")
    status = main([str(src), "-r", "--ckpt", ckpt, "--out", str(out)])
    captured = capsys.readouterr()
    assert status == 1
    assert re.search(r"error: .*b\.png: its output folder .*sub leads outside --out", captured.err), captured.err
    assert os.listdir(outside) == [] and (out / "a.png").is_file()


# ---------------------------------------------------------------- formats checked before running
def _count_restores(monkeypatch):
    calls = []
    real_restore = restore_cli.restore
    monkeypatch.setattr(restore_cli, "restore", lambda model, image, **kw: calls.append(image.shape) or
                        real_restore(model, image, **kw))
    return calls


def test_outputs_that_cannot_be_written_are_refused_before_running(tmp_path, ckpt, capsys, monkeypatch):
    src = tmp_path / "in"
    _write(src / "anim.gif", np.full((8, 8, 3), 50, np.uint8))
    ok, png = cv2.imencode(".png", np.full((8, 8, 3), 50, np.uint8))
    (src / "scan").write_bytes(png.tobytes())  # a PNG without an extension
    _write(src / "rgba.png", np.full((8, 8, 4), 50, np.uint8))
    _write(src / "ok.png", np.full((8, 16, 3), 50, np.uint8))
    calls = _count_restores(monkeypatch)
    out = tmp_path / "out"
    status = main([str(src / n) for n in ("anim.gif", "scan", "ok.png")] + ["--ckpt", ckpt, "--out", str(out)])
    captured = capsys.readouterr()
    assert status == 1 and len(calls) == 1, "only ok.png was restored"
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, captured.err
    assert "anim.gif: cannot write .gif" in errors[0] and "--ext" in errors[0]
    assert "scan: a file without an extension has no output format" in errors[1] and "--ext" in errors[1]
    assert "restored 1 of 3 files" in captured.out and sorted(os.listdir(out)) == ["ok.png"]
    calls.clear()
    status = main([str(src / "rgba.png"), str(src / "ok.png"), "--ckpt", ckpt, "--out", str(out), "--ext", "jpg"])
    captured = capsys.readouterr()
    assert status == 1 and len(calls) == 1
    assert re.search(r"error: .*rgba\.png: the image has an alpha channel, which JPEG cannot hold", captured.err)
    assert sorted(os.listdir(out)) == ["ok.jpg", "ok.png"]
    assert main([str(src / "anim.gif"), str(src / "scan"), "--ckpt", ckpt, "--out", str(out), "--ext", "png"]) == 0
    assert sorted(os.listdir(out)) == ["anim.png", "ok.jpg", "ok.png", "scan.png"]


# ---------------------------------------------------------------- what a run shows
def test_a_line_per_file_when_not_on_a_terminal(tmp_path, ckpt, capsys, monkeypatch):
    _write(tmp_path / "in" / "a.png", np.full((16, 24, 3), 50, np.uint8))
    _write(tmp_path / "in" / "b.jpg", np.full((8, 16, 3), 50, np.uint8))
    out = tmp_path / "out"
    assert main([str(tmp_path / "in"), "--ckpt", ckpt, "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    for i, (name, size) in enumerate([("a.png", "24x16"), ("b.jpg", "16x8")]):
        src, dst = re.escape(str(tmp_path / "in" / name)), re.escape(str(out / name))
        assert re.fullmatch(rf"\[{i + 1}/2\] {src}: {size}, \d+\.\d s -> {dst}", lines[i]), lines[i]
    assert main([str(tmp_path / "in"), "--ckpt", ckpt, "--out", str(tmp_path / "o2"), "--no-progress"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1, "the summary only"
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # a terminal: the bar, no lines
    assert main([str(tmp_path / "in"), "--ckpt", ckpt, "--out", str(tmp_path / "o3")]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 1 and "files:" in captured.err
