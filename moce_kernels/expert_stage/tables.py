"""Device-resident int64 meta tables, built once per content and kept while a CUDA graph may read them.

A kernel launch reads its meta table (:mod:`.layouts`) through a raw device pointer; a CUDA graph
captured around that launch replays the same pointer. So a table used while the current stream is
capturing is never freed: :class:`TableCache` moves it out of its least-recently-used set into a
pinned set that lives as long as the cache (the process-wide cache of :func:`device_table` and
:func:`cached_table`, which the expert stage's plans and the plain ops use). Tables built outside
any capture are bounded by the cache's capacity.
"""
from __future__ import annotations

import collections
from typing import Callable, Dict, Hashable, Sequence

import torch

Rows = Sequence[Sequence[int]]


def capturing(device: torch.device) -> bool:
    """True while the current CUDA stream of ``device`` is capturing a graph (never on other devices)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def to_device(rows: Rows, device: torch.device) -> torch.Tensor:
    """``rows`` as a new int64 (len(rows), width) tensor on ``device``."""
    return torch.tensor([list(r) for r in rows], dtype=torch.int64, device=device)


class TableCache:
    """Tables by key (the key names the content: equal keys, equal rows), each built once.

    At most ``capacity`` unpinned tables are kept (least recently used first out); a table returned
    while ``device`` is capturing a CUDA graph is pinned for the life of the cache.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._lru: "collections.OrderedDict[Hashable, torch.Tensor]" = collections.OrderedDict()
        self._pinned: Dict[Hashable, torch.Tensor] = {}

    def get(self, key: Hashable, rows: Callable[[], Rows], device: torch.device) -> torch.Tensor:
        """The table of ``key`` on ``device`` (``rows()`` is called only to build it)."""
        t = self._pinned.get(key)
        if t is not None:
            return t
        t = self._lru.get(key)
        if t is None:
            t = self._lru[key] = to_device(rows(), device)
            if len(self._lru) > self.capacity:
                self._lru.popitem(last=False)
        else:
            self._lru.move_to_end(key)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():  # capturing(device), inlined
            self._pinned[key] = self._lru.pop(key)
        return t

    def __len__(self) -> int:
        return len(self._lru) + len(self._pinned)

    def pinned(self) -> int:
        """Number of tables kept for a captured graph."""
        return len(self._pinned)


_SHARED = TableCache(capacity=4096)


def device_table(rows: Rows, device: torch.device) -> torch.Tensor:
    """An int64 device tensor of ``rows``, cached per content (process-wide), so that steady-state
    calls do no host->device copy and CUDA graphs can capture the launches that read it."""
    return _SHARED.get((device, tuple(map(tuple, rows))), lambda: rows, device)


def cached_table(key: Hashable, rows: Callable[[], Rows], device: torch.device) -> torch.Tensor:
    """The process-wide table named by ``key`` (which must determine its rows), on ``device``."""
    return _SHARED.get((device, key), rows, device)
