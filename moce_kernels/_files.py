"""File writing shared by the package: atomic replacement of a file's contents."""
from __future__ import annotations

import errno
import os
import re
import secrets

# the name write_atomic gives its temporary file: f"{path}{suffix}", the suffix matching this
TEMP_SUFFIX = re.compile(r"\.\d+\.[0-9a-f]{8}\.tmp")


def _new_temp_beside(path: str) -> "tuple[str, int]":
    """A new file beside ``path`` (name and open descriptor), created exclusively: never an existing
    file, nor a symbolic link planted at its name."""
    for _ in range(100):
        tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"  # TEMP_SUFFIX
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", path)


def _move_without_replacing(tmp: str, path: str) -> None:
    """Give ``tmp``'s file the name ``path`` unless ``path`` exists (a dangling link included):
    atomically by a hard link where the file system has them."""
    try:
        os.link(tmp, path, follow_symlinks=False)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "exists; not replaced", path) from None
    except OSError:  # no hard links on this file system: check, then rename (not atomic)
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "exists; not replaced", path) from None
        os.replace(tmp, path)


def write_atomic(path: "str | os.PathLike", data: bytes, replace: bool = True) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it, then rename: a failure
    leaves no partial file, and a reader never sees one. A symbolic link at ``path`` is replaced,
    never written through. With ``replace=False`` an existing ``path`` raises ``FileExistsError``
    and is left as it was."""
    path = os.fspath(path)
    tmp, fd = _new_temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if replace:
            os.replace(tmp, path)
        else:
            _move_without_replacing(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)
