"""Importing every module of a package: how the ops layer and each backend find their op families, so that
a new family's module needs no line in another file."""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import Iterable, List


def import_all(package: str, path: Iterable[str]) -> List[ModuleType]:
    """Import the modules of ``package`` (its ``__path__``) whose names do not start with ``_``, in name
    order; returns them."""
    names = sorted(m.name for m in pkgutil.iter_modules(list(path)) if not m.name.startswith("_"))
    return [importlib.import_module(f"{package}.{name}") for name in names]
