"""Restoring collections of image files on Ray Data, across GPUs and machines (``moce-restore --ray``).

A dataset of (input, output) paths runs through :class:`RestoreFiles` with ``Dataset.map_batches``:
each actor loads the model once (``moce-restore``'s own loader, so the same checkpoint handling,
device, dtype, backend and ``--optimize``), then restores every file of each batch it is given with
``moce-restore``'s own per-file function (decode, :func:`moce_kernels.restore` with its tiling and
routing, encode), so an output is bitwise the one ``moce-restore`` writes on the same device with the
same number of CPU threads. A file that fails is reported in its result row and the run goes on.

Failures of workers. Ray Data restarts a dead actor and runs its unfinished batch again (by default
without a limit), so a file can be restored twice: once by the worker that died, once by its
replacement. That is harmless by construction:
- every output is written to a temporary name beside it and renamed (atomic on one file system), so an
  output is either absent or complete, and a second write replaces it with the same bytes;
- the summary counts the dataset's result rows, which Ray emits once per input row: the rows of a
  batch whose worker died are dropped with it;
- temporary files of writes cut short by a dead worker are removed by the driver after the run.

On a cluster of several machines the input and output paths must name one shared file system.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from ._files import TEMP_SUFFIX



@dataclass
class RaySummary:
    """What a Ray run did: files restored, their megapixels, (input, one-line error) per failure, and the
    inputs that have a result (restored or failed)."""

    done: int = 0
    megapixels: float = 0.0
    failed: List[Tuple[str, str]] = field(default_factory=list)
    finished: Set[str] = field(default_factory=set)


class RayRunError(RuntimeError):
    """A Ray run that stopped before every file had its result; :attr:`summary` holds the results so far."""

    def __init__(self, message: str, summary: RaySummary):
        super().__init__(message)
        self.summary = summary


class RestoreFiles:
    """Callable class for ``Dataset.map_batches``: restores the files of a batch of rows.

    Rows: ``src`` (input path) and ``dst`` (output path). The result batch has, per row, ``src``,
    ``ok`` (bool), ``megapixels`` (float; 0 for a failure) and ``error`` (one line; "" for success).

    Args:
        args: ``moce-restore``'s parsed arguments (``ckpt``, ``preset``, ``device``, ``dtype``,
            ``backend``, ``optimize``, ``tile``, ``overlap``, ``tile_batch``, ``routing``, ``quality``).
    """

    def __init__(self, args: argparse.Namespace):
        import torch
        from .cli.restore import RestoreOptions, load_model, model_restorer
        torch.set_grad_enabled(False)
        self.model = load_model(args)
        # overwrite: the driver's plan skipped the outputs that existed before the run, so an output found at
        # write time is one that a retried batch's dead worker wrote (the same bytes); it is replaced
        self.options = RestoreOptions(tile=args.tile, overlap=args.overlap, routing=args.routing,
                                      tile_batch=args.tile_batch, quality=args.quality, overwrite=True,
                                      progress=False)
        self.restore_image = model_restorer(self.model, self.options)

    def restore_one(self, src: str, dst: str) -> Tuple[bool, float, str]:
        """(restored, megapixels, error line) for one file."""
        import torch
        from .cli._common import UsageError, one_line
        from .cli.restore import Job, restore_file
        from .imageio import ImageError
        try:
            with torch.no_grad():
                return True, restore_file(self.restore_image, Job(src, dst), self.options).megapixels, ""
        except (ImageError, UsageError) as e:  # their messages name the file, as in moce-restore's run_jobs
            return False, 0.0, one_line(e)
        except Exception as e:  # the run goes on; the summary reports it
            return False, 0.0, f"{src}: {one_line(e)}"

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        results = [self.restore_one(str(s), str(d)) for s, d in zip(batch["src"], batch["dst"])]
        return {"src": np.asarray(batch["src"], dtype=object),
                "ok": np.array([r[0] for r in results], dtype=bool),
                "megapixels": np.array([r[1] for r in results], dtype=np.float64),
                "error": np.array([r[2] for r in results], dtype=object)}


def remove_partials(dsts: Sequence[str]) -> int:
    """Remove the temporary files that writes of these outputs left behind (a worker killed while
    writing); returns how many. Call only when no writer is running."""
    removed = 0
    for dst in dsts:
        folder, name = os.path.split(dst)
        try:
            entries = os.listdir(folder or ".")
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry.startswith(name) and TEMP_SUFFIX.fullmatch(entry[len(name):]):
                os.remove(os.path.join(folder, entry))
                removed += 1
    return removed


def _actor_resources(args: argparse.Namespace) -> Dict[str, Any]:
    """Per actor: one GPU for a CUDA device, else one CPU (torch then runs one intra-op thread)."""
    import torch
    if torch.device(args.device).type == "cuda":
        return {"num_gpus": 1}
    return {"num_cpus": 1}


def restore_on_ray(args: argparse.Namespace, jobs: Sequence[Tuple[str, str]], *, address: Optional[str] = None,
                   workers: Optional[int] = None, files_per_batch: int = 1,
                   worker_class: type = RestoreFiles) -> RaySummary:
    """Restore ``jobs`` ((input, output) paths) on Ray Data with ``workers`` actors of ``worker_class``
    (:class:`RestoreFiles` or a subclass, built with ``args``).

    Uses the Ray runtime of this process if there is one; else connects to ``address`` (``None``: a new
    local runtime, or the cluster ``RAY_ADDRESS`` names) and shuts it down afterwards. ``workers``:
    actors (default: the cluster's GPUs for a CUDA device, else 1); ``files_per_batch``: files per batch
    (what a dead worker's replacement runs again). Raises :class:`RayRunError` (with the results so far)
    if the run cannot start (a CUDA device on a cluster without GPUs) or stops.
    """
    import ray
    if files_per_batch < 1:
        raise ValueError(f"files_per_batch must be positive, got {files_per_batch}")
    started = not ray.is_initialized()
    if started:
        ray.init(address=address or None, logging_level="ERROR", log_to_driver=False)
    try:
        resources = _actor_resources(args)
        if workers is None:
            workers = max(1, int(ray.cluster_resources().get("GPU", 1))) if "num_gpus" in resources else 1
        if workers < 1:
            raise ValueError(f"workers must be positive, got {workers}")
        summary = RaySummary()
        if not jobs:
            return summary
        if "num_gpus" in resources and not ray.cluster_resources().get("GPU"):
            raise RayRunError(f"--device {args.device}: the Ray cluster has no GPU", summary)
        rows = [{"src": src, "dst": dst} for src, dst in jobs]
        ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), 4 * workers)).map_batches(
            worker_class, fn_constructor_kwargs={"args": args}, batch_size=files_per_batch,
            concurrency=workers, **resources)
        try:
            for row in ds.iter_rows():
                summary.finished.add(str(row["src"]))
                if row["ok"]:
                    summary.done += 1
                    summary.megapixels += float(row["megapixels"])
                else:
                    summary.failed.append((str(row["src"]), str(row["error"])))
        except Exception as e:  # Ray's own errors (a worker that cannot start, a lost cluster, ...)
            from .cli._common import one_line
            raise RayRunError(f"the Ray run stopped: {one_line(e)}", summary) from e
        return summary
    finally:
        remove_partials([dst for _, dst in jobs])
        if started:
            ray.shutdown()


def check_arguments(args: argparse.Namespace) -> None:
    """What ``moce-restore`` checks before a run, without the driver holding the model on the workers'
    device: Ray Data installed, the device and dtype pair, and the checkpoint and tiling options (the model
    is loaded once on the CPU here and dropped). Raises ``UsageError``."""
    import torch
    from .cli._common import UsageError
    from .cli.restore import load_model
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise UsageError(f"--device {args.device!r}: {e}") from None
    try:
        import ray.data  # noqa: F401
    except ImportError as e:
        raise UsageError(f"--ray needs Ray Data ({e}): pip install 'ray[data]' (the package's 'ray' extra)") from None
    if args.ray_workers is not None and args.ray_workers < 1:
        raise UsageError(f"--ray-workers must be positive, got {args.ray_workers}")
    if device.type == "cpu" and args.dtype != "fp32":
        raise UsageError(f"--dtype {args.dtype} needs a GPU; on CPU the model runs in fp32")
    load_model(argparse.Namespace(**dict(vars(args), device="cpu", dtype="fp32", optimize=False)))


def run_jobs_on_ray(args: argparse.Namespace, jobs, tally) -> None:
    """``moce-restore``'s ``run_jobs`` on Ray: each failure reported in one line on stderr; a run that stops
    is reported in one line, and the files it left without a result count as failed. Adds to ``tally``
    (``moce_kernels.cli.restore.Tally``)."""
    try:
        summary = restore_on_ray(args, [(job.src, job.dst) for job in jobs], address=args.ray or None,
                                 workers=args.ray_workers)
    except RayRunError as e:
        summary = e.summary
        print(f"error: {e}", file=sys.stderr)
        tally.failed += [job.src for job in jobs if job.src not in summary.finished]
    for src, message in summary.failed:
        tally.failed.append(src)
        print(f"error: {message}", file=sys.stderr)
    tally.restored += summary.done
    tally.megapixels += summary.megapixels
