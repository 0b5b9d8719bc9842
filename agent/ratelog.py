"""Rate-limited logging: what a flood from the Internet may cost the journal.

Owns one token bucket per kind of line. It decides whether a line is written and counts the ones
it held back, so the next line written says how many were not; it never formats or stores what
it drops, and never logs an address or a subject (its callers pass reason words and ids only).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping


class RateLimit:
    """A token bucket: ``burst`` lines at once, then ``per_minute`` on average."""

    def __init__(
        self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if per_minute <= 0 or burst < 1:
            raise ValueError("a rate limit needs per_minute > 0 and burst >= 1")
        self._rate = per_minute / 60.0
        self._burst = float(burst)
        self._tokens = float(burst)
        self._clock = clock
        self._at = clock()
        self._held = 0
        self._lock = threading.Lock()

    def take(self) -> int | None:
        """None when the line must be held back; else how many were held back before it."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
            self._at = now
            if self._tokens < 1.0:
                self._held += 1
                return None
            self._tokens -= 1.0
            held, self._held = self._held, 0
            return held


class RateLimitedLog:
    """A logger whose lines of one kind pass through one ``RateLimit``.

    ``emit(level, kind, message, *args, fields=...)`` writes ``message`` (``%``-style ``args``)
    with ``fields`` as journal fields, unless the kind's bucket is empty; a line written after
    some were held back ends with how many.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        per_minute: float = 30,
        burst: int = 10,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._per_minute = per_minute
        self._burst = burst
        self._clock = clock
        self._limits: dict[str, RateLimit] = {}
        self._lock = threading.Lock()

    def _limit(self, kind: str) -> RateLimit:
        with self._lock:
            limit = self._limits.get(kind)
            if limit is None:
                limit = RateLimit(self._per_minute, self._burst, self._clock)
                self._limits[kind] = limit
            return limit

    def emit(
        self,
        level: int,
        kind: str,
        message: str,
        *args: object,
        fields: Mapping[str, str] | None = None,
    ) -> bool:
        """Write the line unless ``kind``'s limit holds it back; True when written."""
        held = self._limit(kind).take()
        if held is None:
            return False
        if held:
            message += " (%d more like it not logged)"
            args = (*args, held)
        self._log.log(level, message, *args, extra=dict(fields or {}))
        return True
