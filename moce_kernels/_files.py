"""File writing shared by the package: atomic replacement of a file's contents."""
from __future__ import annotations

import os


def write_atomic(path: "str | os.PathLike", data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it, then rename: a failure
    leaves no partial file, and a reader never sees one."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
