"""Keeps the privacy policy where a log line is not written by hand: exceptions.

A log line the agent writes names requests, never a subject or an address; but an unexpected
exception's message can hold anything (``KeyError('198.18.0.7')``), and ``JournalHandler``
would send it twice, in EXCEPTION_TEXT and, as the exception object's repr, in EXCEPTION_INFO.
``ExceptionsWithoutMessages`` replaces a record's exception by its traceback frames and type
(with the errno of an ``OSError``), its message left out, before any handler formats it. It
performs no I/O and never drops a record.
"""

from __future__ import annotations

import logging
import traceback

__all__ = ["ExceptionsWithoutMessages", "describe_exception"]


def describe_exception(exc: BaseException) -> str:
    """The traceback and the exception's type (and errno name), without its message; chained
    causes likewise."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        frames = "".join(traceback.format_tb(current.__traceback__))
        kind = type(current).__qualname__
        if isinstance(current, OSError) and current.errno is not None:
            kind += f" (errno {current.errno})"
        parts.append(f"Traceback (most recent call last):\n{frames}{kind}: (message withheld)")
        current = current.__cause__ or current.__context__
    return "\n\nwhile handling:\n".join(reversed(parts))


class ExceptionsWithoutMessages(logging.Filter):
    """A handler filter: the record keeps its traceback and exception type, not the message."""

    def filter(self, record: logging.LogRecord) -> bool:
        info = record.exc_info
        if info and info[1] is not None:
            record.exc_text = describe_exception(info[1])
            record.exc_info = None
        return True
