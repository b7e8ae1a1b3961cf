"""A small cache of what is derived from objects that never change once made.

Feature specs, concept maps and loaded models are built once and then only
read; the work derived from them (polars expressions, finishing plans,
feature bounds) is worth keeping between requests. They are not hashable,
and comparing them by value would cost more than the work saved, so entries
are keyed by the owners' identity. An id can be reused once an object is
freed, so an entry is used only while its owners are the very objects it
was made from; the oldest entry goes when the cache is full.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any


class IdentityCache:
    """Values keyed by (the identity of their owner objects, a hashable detail); at most `size` entries."""

    def __init__(self, size: int):
        self.size = size
        self._entries: dict[tuple, tuple[tuple, Any]] = {}

    def get(self, owners: Sequence[object], detail: Hashable = None) -> Any | None:
        """The value stored for exactly these owner objects and `detail`, or None."""
        hit = self._entries.get((tuple(map(id, owners)), detail))
        if hit is not None and all(a is b for a, b in zip(hit[0], owners, strict=True)):
            return hit[1]
        return None

    def put(self, owners: Sequence[object], detail: Hashable, value: Any) -> Any:
        """Store `value` (evicting the oldest entry when full) and return it."""
        if len(self._entries) >= self.size:
            self._entries.pop(next(iter(self._entries), None), None)  # another thread may evict too
        self._entries[(tuple(map(id, owners)), detail)] = (tuple(owners), value)
        return value
