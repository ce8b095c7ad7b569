"""moce-restore: restore image files with MoCE-IR, tiled, at any size.

    moce-restore photos/ --recursive --ckpt MoCE_IR_S.safetensors --out restored/
    moce-restore scan.tif 'shots/*.jpg' --ckpt last.ckpt --preset MoCE_IR --out restored/ --ext png

Inputs are files, folders (their images; every subfolder with --recursive) and glob patterns.
Outputs keep the inputs' folder structure below --out (relative to the inputs' common folder), name
(plus --suffix) and format (or --ext), bit depth (8/16-bit PNG and TIFF), gray or colour, and
alpha (copied untouched); EXIF orientation is applied. The run refuses to start if an output
would overwrite an input or two inputs would write the same output. A file that fails is reported
in one line and the run goes on; the exit status is 1 if any file failed (2 for a refused run).
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..imageio import EXTENSIONS, ImageError, from_tensor, read_image, to_tensor, write_image
from ..restoration import ROUTINGS, restore
from ._common import UsageError, one_line, plain_warnings

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OUTPUT_EXTENSIONS = ("png", "tif", "tiff", "jpg", "jpeg", "webp")


@dataclass(frozen=True)
class Job:
    """One input file and where its output goes."""

    src: str
    dst: str


@dataclass(frozen=True)
class RestoreOptions:
    """How each file is restored and written."""

    tile: Optional[int] = None
    overlap: int = 32
    routing: str = "image"
    tile_batch: Optional[int] = None
    quality: int = 95
    progress: bool = False


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
    ap.add_argument("--no-progress", action="store_true", help="no progress bars (they show on terminals only)")
    return ap


# ---------------------------------------------------------------- inputs and outputs
def _images_in(folder: str, recursive: bool, skip: str) -> List[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if os.path.realpath(os.path.join(root, d)) != skip) if recursive else []
        found += [os.path.join(root, f) for f in sorted(files) if os.path.splitext(f)[1].lower() in EXTENSIONS]
    return found


def _glob_root(pattern: str) -> str:
    """The folder part of ``pattern`` before its first wildcard."""
    parts = pattern.split(os.sep)
    first_magic = next(i for i, p in enumerate(parts) if glob.has_magic(p))
    return os.sep.join(parts[:first_magic]) or "."


def collect_inputs(specs: Sequence[str], recursive: bool, out_dir: str) -> Tuple[List[Tuple[str, str]], List[str]]:
    """((file, the folder its output path is relative to) for every input image, specs that matched nothing).

    Folders give their images (by extension; not those inside ``out_dir``); globs give what they match.
    """
    skip = os.path.realpath(out_dir)
    found: List[Tuple[str, str]] = []
    missing: List[str] = []
    for spec in specs:
        if os.path.isfile(spec):
            found.append((spec, os.path.dirname(spec) or "."))
        elif os.path.isdir(spec):
            found += [(f, spec) for f in _images_in(spec, recursive, skip)]
        elif glob.has_magic(spec):
            root = _glob_root(spec)
            matches = sorted(glob.glob(spec, recursive=recursive))
            for m in matches:
                found += [(m, root)] if os.path.isfile(m) else [(f, root) for f in _images_in(m, recursive, skip)]
            if not matches:
                missing.append(spec)
        else:
            missing.append(spec)
    return found, missing


def plan_jobs(inputs: Sequence[Tuple[str, str]], out_dir: str, suffix: str = "",
              ext: Optional[str] = None) -> List[Job]:
    """Output path of every input below ``out_dir``: its path relative to the inputs' common folder, with
    ``suffix`` and ``ext``. Raises :class:`UsageError` if an output would overwrite an input or two
    inputs would write one output."""
    unique: Dict[str, Tuple[str, str]] = {}
    for path, root in inputs:
        unique.setdefault(os.path.realpath(path), (path, root))
    if not unique:
        return []
    common = os.path.commonpath([os.path.realpath(root) for _, root in unique.values()])
    jobs, by_dst = [], {}
    for real, (path, _) in unique.items():
        rel = os.path.relpath(real, common)
        stem, own_ext = os.path.splitext(rel)
        dst = os.path.join(out_dir, stem + suffix + ("." + ext if ext else own_ext))
        real_dst = os.path.realpath(dst)
        if real_dst in unique or (os.path.exists(dst) and any(os.path.samefile(dst, p) for p in unique)):
            raise UsageError(f"refusing to run: the output {dst} would overwrite the input "
                             f"{unique.get(real_dst, (dst,))[0]}; choose another --out or give a --suffix")
        if real_dst in by_dst:
            raise UsageError(f"refusing to run: {by_dst[real_dst]} and {path} would both be written to {dst}")
        by_dst[real_dst] = path
        jobs.append(Job(path, dst))
    return jobs


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


def restore_file(model: nn.Module, job: Job, options: RestoreOptions) -> float:
    """Restore one file (read, :func:`moce_kernels.restore`, write); returns its megapixels."""
    picture = read_image(job.src)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    image = to_tensor(picture).to(device)
    restored = restore(model, image, tile=options.tile, overlap=options.overlap, routing=options.routing,
                       tile_batch=options.tile_batch, progress=options.progress)
    os.makedirs(os.path.dirname(job.dst) or ".", exist_ok=True)
    write_image(job.dst, from_tensor(restored, picture), quality=options.quality)
    return picture.megapixels


def run_jobs(model: nn.Module, jobs: Sequence[Job], options: RestoreOptions, failed: List[str]) -> Tuple[int, float]:
    """Restore every job, reporting each failure in one line; (files restored, megapixels)."""
    from tqdm.auto import tqdm
    done, megapixels = 0, 0.0
    bar = tqdm(jobs, unit="file", desc="files", disable=not options.progress)
    for job in bar:
        try:
            megapixels += restore_file(model, job, options)
            done += 1
        except (ImageError, UsageError) as e:
            failed.append(job.src)
            tqdm.write(f"error: {one_line(e)}", file=sys.stderr)
        except Exception as e:  # the run goes on; the exit status reports it
            failed.append(job.src)
            tqdm.write(f"error: {job.src}: {one_line(e)}", file=sys.stderr)
    return done, megapixels


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # inputs may follow options
    progress = not args.no_progress and sys.stderr.isatty()
    options = RestoreOptions(tile=args.tile, overlap=args.overlap, routing=args.routing, tile_batch=args.tile_batch,
                             quality=args.quality, progress=progress)
    start = time.perf_counter()
    with plain_warnings():
        try:
            found, missing = collect_inputs(args.inputs, args.recursive, args.out)
            jobs = plan_jobs(found, args.out, args.suffix, args.ext)
            if not jobs and not missing:
                raise UsageError(f"no images found in {' '.join(args.inputs)} (extensions: {', '.join(EXTENSIONS)})")
            model = load_model(args)
        except UsageError as e:
            print(f"moce-restore: {e}", file=sys.stderr)
            return 2
        failed = []
        for spec in missing:
            failed.append(spec)
            print(f"error: {spec}: no such file, folder or matching files", file=sys.stderr)
        with torch.no_grad():
            done, megapixels = run_jobs(model, jobs, options, failed)
    seconds = time.perf_counter() - start
    total = len(jobs) + len(missing)
    print(f"restored {done} of {total} files ({megapixels:.3g} megapixels) in {seconds:.1f} s"
          + (f"; {len(failed)} failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
