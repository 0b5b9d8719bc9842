"""The cyclic garbage collector held off while a large request is worked on.

A 100,000-entry Sync makes a few million short- and long-lived objects (messages, entries,
records, rows) and almost no reference cycles. The collector cannot know that: every few
thousand allocations it runs, and as the surviving objects pile up it keeps walking all of them
again, about a quarter of such a Sync's time (measured: 6.5 s -> 5.1 s end to end). Memory is
still freed as it always is, by reference counting; only cycles wait until the pause ends, and
the writer collects once it is idle after a large batch (``Engine._release_memory``).

The collector is one switch for the whole process and pauses may overlap (a large request is
validated on one thread while the writer applies the one before it), so the pauses are counted
and the last to end switches it back on, only if it was on before the first.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager


class _Pauses:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0
        self._resume = False

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._lock:
            if self._count == 0:
                self._resume = gc.isenabled()
                gc.disable()
            self._count += 1
        try:
            yield
        finally:
            with self._lock:
                self._count -= 1
                if self._count == 0 and self._resume:
                    gc.enable()


_PAUSES = _Pauses()


def collector_paused() -> AbstractContextManager[None]:
    """No cyclic collection until the block ends (and no other pause is still on)."""
    return _PAUSES.held()
