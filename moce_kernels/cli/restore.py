"""moce-restore: restore image files with MoCE-IR, tiled, at any size.

    moce-restore photos/ --recursive --ckpt MoCE_IR_S.safetensors --out restored/
    moce-restore scan.tif 'shots/*.jpg' --ckpt last.ckpt --preset MoCE_IR --out restored/ --ext png

Inputs are files, folders (their images; every subfolder with --recursive) and glob patterns,
taken under the names given (symbolic links are not resolved). Outputs keep the inputs' folder
structure below --out (relative to the inputs' common folder), name (plus --suffix) and format
(or --ext), bit depth (8/16-bit PNG and TIFF), gray or colour, and alpha (copied untouched); EXIF
orientation is applied. The run refuses to start if an output would overwrite an input or two
inputs would write the same output. An output that exists is skipped (said in one line) unless
--overwrite. Before anything runs, a file whose output cannot be written (its format, e.g. GIF or
no extension) is refused in one line; so is, before it is restored, one whose image the output
format cannot hold (alpha into JPEG). A file that fails is reported in one line and the run goes
on. On a terminal a progress bar shows; elsewhere a line per file restored (name, size, seconds).
Exit status: 0 when every file was restored or skipped, 1 if any failed, 2 for a refused run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn as nn

from ..imageio import EXTENSIONS, WRITABLE_EXTENSIONS, ImageError, Picture, from_tensor, read_image, to_tensor, \
    write_image, write_problem
from ..restoration import ROUTINGS, restore
from ._common import UsageError, one_line, plain_warnings
from ._inputs import Found, Job, Plan, collect_inputs, plan_jobs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OUTPUT_EXTENSIONS = tuple(e.lstrip(".") for e in WRITABLE_EXTENSIONS)

RestoreImage = Callable[[torch.Tensor], torch.Tensor]
"""Restores one image: (1, 3, H, W) float32 RGB in [0, 1] on the CPU -> (1, 3, H, W) RGB, any device
and float dtype (clipped to [0, 1] when written)."""


@dataclass(frozen=True)
class RestoreOptions:
    """How each file is restored and written, and what a run shows: ``progress`` (tqdm bars, for
    terminals) or ``file_lines`` (a line per file restored: name, size, seconds)."""

    tile: Optional[int] = None
    overlap: int = 32
    routing: str = "image"
    tile_batch: Optional[int] = None
    quality: int = 95
    overwrite: bool = False
    progress: bool = False
    file_lines: bool = False


@dataclass
class Tally:
    """What a run did with its files: how many restored (and their megapixels), skipped and failed."""

    restored: int = 0
    megapixels: float = 0.0
    skipped: List[str] = field(default_factory=list)
    failed: List[str] = field(default_factory=list)


class OutputExists(Exception):
    """The output file appeared after the run was planned; it is left as it is."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moce-restore", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="image files, folders or glob patterns (quote them)")
    ap.add_argument("--out", required=True, help="output folder (created if needed)")
    ap.add_argument("--ckpt", required=True, help="weights: .safetensors (moce-convert-ckpt), released .ckpt, "
                                                  "or a plain state dict")
    ap.add_argument("--preset", choices=["MoCE_IR", "MoCE_IR_S"], help="configuration for a checkpoint that does "
                                                                       "not store one (default: inferred)")
    ap.add_argument("-r", "--recursive", action="store_true", help="descend into subfolders (and ** in globs)")
    ap.add_argument("--suffix", default="", help="added to every output name before the extension, e.g. _restored")
    ap.add_argument("--ext", choices=OUTPUT_EXTENSIONS, help="output format (default: the input's)")
    ap.add_argument("--overwrite", action="store_true", help="replace outputs that exist (default: skip them)")
    ap.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality (default 95)")
    ap.add_argument("--tile", type=int, default=None, help="tile side in pixels (default: from the memory budget; "
                                                           "0: no tiling)")
    ap.add_argument("--overlap", type=int, default=32, help="tile overlap in pixels (default 32)")
    ap.add_argument("--tile-batch", type=int, default=None, help="tiles per forward (default: what fits)")
    ap.add_argument("--routing", choices=ROUTINGS, default="image",
                    help="image: every tile runs with its image's experts (default); tile: each tile routes alone")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="bf16/fp16 need a GPU")
    ap.add_argument("--backend", default="auto", help="moce_kernels backend (default auto)")
    ap.add_argument("--optimize", action="store_true", help="run moce_kernels.optimize(model) first")
    ap.add_argument("--runtime", choices=["torch", "onnxruntime", "openvino"], default="torch",
                    help="run the tiles in PyTorch (default) or, on the CPU, through the exported ONNX graph in "
                         "ONNX Runtime or OpenVINO (--ckpt: an .onnx from moce-export, or a checkpoint, exported "
                         "first); routing is then per tile")
    ap.add_argument("--no-progress", action="store_true",
                    help="no progress bars (on terminals) and no line per file (elsewhere)")
    ap.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                    help="restore on Ray Data (moce_kernels.ray_restore): one model per actor, one GPU each on cuda, "
                         "else one CPU; ADDRESS: a Ray cluster (default: a local runtime). Write --ray=ADDRESS, or "
                         "put --ray after the inputs")
    ap.add_argument("--ray-workers", type=int, default=None, help="with --ray: actors (default: the cluster's GPUs "
                                                                  "on cuda, else 1)")
    return ap


# ---------------------------------------------------------------- model and files
def _check_tiling(args: argparse.Namespace, pad_multiple: int) -> None:
    if args.tile is not None and (args.tile < 0 or args.tile % pad_multiple):
        raise UsageError(f"--tile must be 0 (no tiling) or a positive multiple of {pad_multiple} for this model, "
                         f"got {args.tile}")
    if args.overlap < 0 or (args.tile and 2 * args.overlap > args.tile):
        raise UsageError(f"--overlap must be in [0, tile/2], got {args.overlap}")
    if args.tile_batch is not None and args.tile_batch < 1:
        raise UsageError(f"--tile-batch must be positive, got {args.tile_batch}")


def load_model(args: argparse.Namespace) -> nn.Module:
    """The model the arguments ask for, in eval mode on its device and dtype (UsageError if impossible)."""
    import moce_kernels
    from moce_kernels import MoCEIR
    if args.runtime != "torch":
        return load_runner(args)
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise UsageError(f"--device {args.device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA GPU is available here; use --device cpu")
    if device.type == "cpu" and args.dtype != "fp32":
        raise UsageError(f"--dtype {args.dtype} needs a GPU; on CPU the model runs in fp32")
    try:
        moce_kernels.set_backend(args.backend)
        model = MoCEIR.from_checkpoint(args.ckpt, preset=args.preset)
    except (ValueError, RuntimeError, OSError) as e:
        raise UsageError(one_line(e)) from None
    _check_tiling(args, model.pad_multiple)
    model = model.eval().to(device, DTYPES[args.dtype])
    if args.optimize:
        optimize = getattr(moce_kernels, "optimize", None)
        if optimize is None:
            raise UsageError("--optimize needs moce_kernels.optimize(), which this version of moce_kernels lacks")
        model = optimize(model)
    return model


def load_runner(args: argparse.Namespace) -> nn.Module:
    """``--runtime onnxruntime|openvino``: the exported graph as a tile runner (CPU, fp32 tiles)."""
    if args.dtype != "fp32" or args.optimize:
        raise UsageError(f"--runtime {args.runtime} runs the graph on the CPU in its own dtype (--device is not "
                         f"used): leave out --dtype and --optimize")
    from moce_kernels.onnx.runtime import load_runner as runner_for
    try:
        runner = runner_for(args.ckpt, args.runtime, preset=args.preset)
    except (ValueError, RuntimeError, OSError, ImportError) as e:
        raise UsageError(one_line(e)) from None
    _check_tiling(args, runner.pad_multiple)
    return runner


def model_restorer(model: nn.Module, options: RestoreOptions) -> RestoreImage:
    """:func:`moce_kernels.restore` with ``model`` on its device, tiled as ``options`` say."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def restore_image(image: torch.Tensor) -> torch.Tensor:
        return restore(model, image.to(device), tile=options.tile, overlap=options.overlap, routing=options.routing,
                       tile_batch=options.tile_batch, progress=options.progress)
    return restore_image


def restore_file(restore_image: RestoreImage, job: Job, options: RestoreOptions) -> Picture:
    """Restore one file: read it, check that its output format holds it (before any restoring),
    ``restore_image``, write (never over an existing file unless ``options.overwrite``: then
    :class:`OutputExists`); returns the picture read."""
    picture = read_image(job.src)
    problem = write_problem(os.path.splitext(job.dst)[1], picture)
    if problem:
        raise ImageError(f"{job.src}: {problem} (--ext)")
    restored = restore_image(to_tensor(picture))
    os.makedirs(os.path.dirname(job.dst) or ".", exist_ok=True)
    try:
        write_image(job.dst, from_tensor(restored, picture), quality=options.quality, overwrite=options.overwrite)
    except FileExistsError as e:
        if e.filename != job.dst:
            raise
        raise OutputExists(job.dst) from None
    return picture


def _error_line(job: Job, error: BaseException) -> str:
    text = one_line(error)
    return f"error: {text}" if job.src in text else f"error: {job.src}: {text}"


def run_jobs(restore_image: RestoreImage, jobs: Sequence[Job], options: RestoreOptions,
             tally: Optional[Tally] = None) -> Tally:
    """Restore every job with ``restore_image``, reporting each failure (and, with ``options.file_lines``,
    each file restored) in one line; adds to ``tally`` and returns it."""
    from tqdm.auto import tqdm
    tally = Tally() if tally is None else tally
    bar = tqdm(jobs, unit="file", desc="files", disable=not options.progress)
    for i, job in enumerate(bar, 1):
        start = time.perf_counter()
        try:
            picture = restore_file(restore_image, job, options)
        except OutputExists:
            tally.skipped.append(job.src)
            tqdm.write(f"skipped: {job.src}: {job.dst} appeared during the run; not replaced", file=sys.stderr)
        except Exception as e:  # the run goes on; the exit status reports it
            tally.failed.append(job.src)
            tqdm.write(_error_line(job, e), file=sys.stderr)
        else:
            tally.restored += 1
            tally.megapixels += picture.megapixels
            if options.file_lines:
                h, w = picture.color.shape[:2]
                print(f"[{i}/{len(jobs)}] {job.src}: {w}x{h}, {time.perf_counter() - start:.1f} s -> {job.dst}",
                      flush=True)
    return tally


def _report_plan(found: Found, plan: Plan, tally: Tally) -> None:
    """One line for each input that will not run (failed or skipped), before the run; counts them in ``tally``."""
    for note in found.notes:
        print(f"note: {note}", file=sys.stderr)
    for name, why in found.problems + plan.refused:
        tally.failed.append(name)
        print(f"error: {name}: {why}", file=sys.stderr)
    for job in plan.skipped:
        tally.skipped.append(job.src)
        print(f"skipped: {job.src}: {job.dst} exists (--overwrite replaces it)", file=sys.stderr)


def _summary(tally: Tally, inputs: int, seconds: float) -> str:
    return (f"restored {tally.restored} of {inputs} files ({tally.megapixels:.3g} megapixels) in {seconds:.1f} s"
            + (f"; {len(tally.skipped)} skipped" if tally.skipped else "")
            + (f"; {len(tally.failed)} failed" if tally.failed else ""))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # inputs may follow options
    terminal = sys.stderr.isatty()
    options = RestoreOptions(tile=args.tile, overlap=args.overlap, routing=args.routing, tile_batch=args.tile_batch,
                             quality=args.quality, overwrite=args.overwrite,
                             progress=terminal and not args.no_progress, file_lines=not terminal and not args.no_progress)
    start = time.perf_counter()
    with plain_warnings():
        try:
            found = collect_inputs(args.inputs, args.recursive, args.out)
            plan = plan_jobs(found.files, args.out, args.suffix, args.ext, args.overwrite)
            if not plan.inputs and not found.problems:
                raise UsageError(f"no images found in {' '.join(args.inputs)} (extensions: {', '.join(EXTENSIONS)})")
            if args.ray is None:
                model = load_model(args)
            else:
                from ..ray_restore import check_arguments
                check_arguments(args)
        except UsageError as e:
            print(f"moce-restore: {e}", file=sys.stderr)
            return 2
        tally = Tally()
        _report_plan(found, plan, tally)
        if args.ray is None:
            with torch.no_grad():
                run_jobs(model_restorer(model, options), plan.jobs, options, tally)
        else:
            from ..ray_restore import run_jobs_on_ray
            run_jobs_on_ray(args, plan.jobs, tally)
    print(_summary(tally, plan.inputs + len(found.problems), time.perf_counter() - start))
    return 1 if tally.failed else 0


if __name__ == "__main__":
    sys.exit(main())
