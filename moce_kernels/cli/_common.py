"""What the console scripts share: one-line messages, warnings and checkpoint loading."""
from __future__ import annotations

import argparse

import contextlib
import sys
import warnings
from typing import Any, Iterator, Optional


class UsageError(Exception):
    """A problem with the command line or the run as a whole: reported in one line, exit status 2."""


def one_line(error: BaseException) -> str:
    """``Type: first line of the message`` (the message alone for ValueError-like errors that name their file)."""
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    if isinstance(error, OSError) and error.strerror:
        first = f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    return first if isinstance(error, (ValueError, UsageError)) else f"{type(error).__name__}: {first}"


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=file or sys.stderr)


@contextlib.contextmanager
def plain_warnings() -> Iterator[None]:
    """Inside the block, warnings print as ``warning: message``, without the source line."""
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        yield


def load_checkpoint(path: str, preset: Optional[str] = None, **kwargs: Any):
    """``MoCEIR.from_checkpoint(path, preset, **kwargs)``; a file it cannot load (missing, damaged, foreign,
    or not fitting the configuration) is a :class:`UsageError` with one line naming the problem."""
    from moce_kernels import MoCEIR
    from moce_kernels.model.checkpoint import CheckpointError
    try:
        return MoCEIR.from_checkpoint(path, preset=preset, **kwargs)
    except (CheckpointError, ValueError, TypeError, RuntimeError, OSError) as e:
        message = one_line(e)
        raise UsageError(message if str(path) in message else f"{path}: {message}") from None


def add_checkpoint_options(ap: argparse.ArgumentParser) -> None:
    """``--preset``, ``--set NAME=VALUE`` (repeatable) and ``--force``: how ``moce-convert-ckpt`` and
    ``moce-export`` are told what a checkpoint cannot tell, and whether to replace ``dst``."""
    ap.add_argument("--preset", choices=["MoCE_IR", "MoCE_IR_S"], help="the configuration to assume")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=VALUE",
                    help="a constructor argument (repeatable), e.g. topk=1")
    ap.add_argument("--force", action="store_true", help="replace dst if it exists")
