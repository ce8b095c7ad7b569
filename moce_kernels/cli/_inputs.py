"""moce-restore's inputs and outputs: the image files that files, folders and globs name, and the
output path of each below ``--out``.

Paths are taken as named, never resolved: a symbolic link is an input under its own name (several
links to one file are several inputs), and its output goes below ``--out`` under that name and its
relative folder. Folder links are followed (``--recursive``, ``**`` in globs) except one that leads
back into a folder being walked (a loop) or into ``--out``. A link whose target is missing, or a
loop of file links, is reported as a failed input. An output folder that leads outside ``--out``
through a link is refused; an output path that exists (a link included) is skipped unless
``overwrite``, and a link there is replaced, never written through (:func:`write_atomic`).
"""
from __future__ import annotations

import errno
import fnmatch
import glob
import os
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

from ..imageio import EXTENSIONS, write_problem
from ._common import UsageError


@dataclass(frozen=True)
class Job:
    """One input file (as named) and where its output goes."""

    src: str
    dst: str


@dataclass
class Found:
    """What the inputs name: ``files`` (file as named, the folder its output path is relative to);
    ``problems`` (name, why) for inputs that give no file to restore (each counts as failed);
    ``notes`` for folder links not followed."""

    files: List[Tuple[str, str]] = field(default_factory=list)
    problems: List[Tuple[str, str]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


@dataclass
class Plan:
    """Every input file's fate before anything runs: ``jobs`` to run, ``skipped`` (their outputs exist),
    ``refused`` (input, why its output cannot be written)."""

    jobs: List[Job] = field(default_factory=list)
    skipped: List[Job] = field(default_factory=list)
    refused: List[Tuple[str, str]] = field(default_factory=list)

    @property
    def inputs(self) -> int:
        return len(self.jobs) + len(self.skipped) + len(self.refused)


# ---------------------------------------------------------------- inputs
def broken_link(path: str) -> Optional[str]:
    """Why the symbolic link ``path`` leads to no file (its target is missing, or a loop); None otherwise."""
    if not os.path.islink(path):
        return None
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symbolic link loop"
        return f"symbolic link to a missing file ({os.readlink(path)})"
    return None


def _glob_start(pattern: str) -> Tuple[str, int]:
    """The folder part of ``pattern`` before its first wildcard ("" for none) and the index of that
    wildcard's part in ``pattern.split(os.sep)``."""
    parts = pattern.split(os.sep)
    first = next(i for i, p in enumerate(parts) if glob.has_magic(p))
    return os.sep.join(parts[:first]) or (os.sep if first else ""), first


def _glob_root(pattern: str) -> str:
    """The folder part of ``pattern`` before its first wildcard (``.`` for none)."""
    return _glob_start(pattern)[0] or "."


class _Collector:
    """Collects :class:`Found` from input specs (see :func:`collect_inputs`)."""

    def __init__(self, recursive: bool, out_dir: str):
        self.recursive = recursive
        self.skip = os.path.realpath(out_dir)
        self.found = Found()

    def add_file(self, path: str, root: str) -> None:
        problem = broken_link(path)
        if problem:
            self.found.problems.append((path, problem))
        else:
            self.found.files.append((path, root))

    def _follow(self, folder: str, ancestors: FrozenSet[str]) -> Optional[FrozenSet[str]]:
        """``ancestors`` plus ``folder``'s real path if it may be entered; None (with a note for a loop) if not."""
        real = os.path.realpath(folder)
        if real == self.skip:
            return None
        if real in ancestors:
            self.found.notes.append(f"{folder}: symbolic link back to {real}, a folder already being read; "
                                    "not followed")
            return None
        return ancestors | {real}

    def walk(self, folder: str, root: str, ancestors: FrozenSet[str] = frozenset()) -> None:
        """The images in ``folder`` (by extension), in name order, and with ``recursive`` its subfolders'."""
        ancestors = ancestors or frozenset({os.path.realpath(folder)})
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            self.found.problems.append((folder, f"cannot read the folder ({e.strerror})"))
            return
        subfolders = []
        for entry in entries:
            path = os.path.join(folder, entry.name)
            if os.path.isdir(path):
                subfolders.append(path)
            elif os.path.splitext(entry.name)[1].lower() in EXTENSIONS:
                self.add_file(path, root)
        for sub in subfolders if self.recursive else []:
            below = self._follow(sub, ancestors)
            if below is not None:
                self.walk(sub, root, below)

    def glob(self, pattern: str) -> List[str]:
        """What ``pattern`` matches (``**``: any folders below, with ``recursive``), sorted; hidden names
        only where the pattern's part starts with a dot, as :func:`glob.glob` does."""
        parts = pattern.split(os.sep)
        if not (self.recursive and "**" in parts):
            return sorted(glob.glob(pattern))
        start, first = _glob_start(pattern)
        matches: List[str] = []
        self._match(start, parts, first, frozenset({os.path.realpath(start or os.curdir)}), matches)
        return sorted(set(matches))

    def _match(self, path: str, parts: Sequence[str], i: int, ancestors: FrozenSet[str], out: List[str]) -> None:
        if i == len(parts):
            if path:
                out.append(path)
            return
        here, part = path or os.curdir, parts[i]
        try:
            names = sorted(os.listdir(here)) if glob.has_magic(part) else [part]
        except OSError:
            return
        if part == "**":
            self._match(path, parts, i + 1, ancestors, out)
            for name in names:
                sub = os.path.join(path, name) if path else name
                if not name.startswith(".") and os.path.isdir(sub):
                    below = self._follow(sub, ancestors)
                    if below is not None:
                        self._match(sub, parts, i, below, out)
            return
        for name in names:
            if glob.has_magic(part) and not (fnmatch.fnmatch(name, part) and (part[0] == "." or name[0] != ".")):
                continue
            sub = os.path.join(path, name) if path else name
            if i + 1 == len(parts):
                if os.path.lexists(sub):
                    out.append(sub)
            elif os.path.isdir(sub):
                self._match(sub, parts, i + 1, ancestors, out)


def collect_inputs(specs: Sequence[str], recursive: bool, out_dir: str) -> Found:
    """The image files that ``specs`` name, each with the folder its output path is relative to.

    Files are taken whatever their extension; folders give their images (by extension; with
    ``recursive`` those of every subfolder, not ``out_dir``); globs give what they match. A spec
    that names nothing, or a link to nothing, is a problem."""
    c = _Collector(recursive, out_dir)
    for spec in specs:
        if os.path.isdir(spec):
            c.walk(spec, spec)
        elif os.path.isfile(spec) or os.path.islink(spec):
            c.add_file(spec, os.path.dirname(spec) or ".")
        elif glob.has_magic(spec):
            root = _glob_root(spec)
            matches = c.glob(spec)
            for m in matches:
                c.walk(m, root) if os.path.isdir(m) else c.add_file(m, root)
            if not matches:
                c.found.problems.append((spec, "no matching files"))
        else:
            c.found.problems.append((spec, "no such file or folder"))
    return c.found


# ---------------------------------------------------------------- outputs
def _output_path(name: str, common: str, out_dir: str, suffix: str, ext: Optional[str]) -> str:
    stem, own_ext = os.path.splitext(os.path.relpath(name, common))
    return os.path.join(out_dir, stem + suffix + ("." + ext if ext else own_ext))


def _file_id(path: str) -> Optional[Tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _refusal(dst: str, real_out: str) -> Optional[str]:
    """Why the output ``dst`` cannot be written (a folder of it leads outside ``--out``, or its format)."""
    folder = os.path.dirname(dst) or "."
    real = os.path.realpath(folder)
    if os.path.commonpath([real_out, real]) != real_out:
        return f"its output folder {folder} leads outside --out (to {real}) through a symbolic link"
    problem = write_problem(os.path.splitext(dst)[1])
    return f"{problem}; choose one with --ext" if problem else None


def plan_jobs(inputs: Sequence[Tuple[str, str]], out_dir: str, suffix: str = "", ext: Optional[str] = None,
              overwrite: bool = False) -> Plan:
    """Where every input goes: below ``out_dir``, its path as named relative to the inputs' common
    folder, with ``suffix`` and ``ext`` (default: its own). One name given twice is one input.
    Raises :class:`UsageError` if an output would overwrite an input or two inputs would write one
    output; an output that exists is skipped unless ``overwrite``; one that cannot be written is refused."""
    named: Dict[Tuple[str, str], Tuple[str, str]] = {}
    for path, root in inputs:
        named.setdefault((os.path.abspath(path), os.path.realpath(path)), (path, root))
    if not named:
        return Plan()
    common = os.path.commonpath([os.path.abspath(root) for _, root in named.values()]
                                + [os.path.dirname(name) for name, _ in named])
    input_ids = {i: path for path, _ in named.values() for i in [_file_id(path)] if i is not None}
    real_out = os.path.realpath(out_dir)
    plan, by_dst = Plan(), {}
    for (name, _), (path, _) in named.items():
        dst = _output_path(name, common, out_dir, suffix, ext)
        clobbered = input_ids.get(_file_id(dst)) if os.path.exists(dst) else None
        if clobbered is not None:
            raise UsageError(f"refusing to run: the output {dst} would overwrite the input {clobbered}; "
                             "choose another --out or give a --suffix")
        real_dst = os.path.realpath(dst)
        if real_dst in by_dst:
            raise UsageError(f"refusing to run: {by_dst[real_dst]} and {path} would both be written to {dst}")
        by_dst[real_dst] = path
        refusal = _refusal(dst, real_out)
        if refusal:
            plan.refused.append((path, refusal))
        elif os.path.lexists(dst) and not overwrite:
            plan.skipped.append(Job(path, dst))
        else:
            plan.jobs.append(Job(path, dst))
    return plan
