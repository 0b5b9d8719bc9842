"""The contract every ``vicifast-agent`` command keeps with whoever runs it: one table of exit
codes, and one shape of error, for the sysadmin's commands (local socket) and ``ctl`` (mTLS)
alike.

Owns the exit codes, their words (for ``--help``, the man page and the README, all rendered from
``EXIT_TABLE``), the argument parser class that turns usage errors into exit 2, and how a failure
is printed: one line on stderr for people, or with ``--json`` one object on stdout::

    {"error": {"reason": "invalid_address", "detail": "...", "code": "INVALID_ARGUMENT",
               "exit_code": 3}}

``reason`` is a stable snake_case word (the agent's own, or ``usage``, ``unreachable`` ...),
``code`` the gRPC status name the agent answered with (``null`` when the problem is on this side),
``exit_code`` the process's exit status; some errors add keys (``socket``, ``request_id``,
``issued_at_ms``, ``hint``). It performs no I/O beyond printing and knows nothing of the agent.
"""

from __future__ import annotations

import argparse
import enum
import json
import sys
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

__all__ = [
    "EXIT_TABLE",
    "CliParser",
    "Exit",
    "Failure",
    "UsageError",
    "exit_epilog",
    "exit_table_markdown",
    "report",
]


class Exit(enum.IntEnum):
    OK = 0
    NO = 1
    USAGE = 2
    REFUSED = 3
    UNREACHABLE = 4
    PROBLEMS = 5
    INTERRUPTED = 130


# The one table. Commands that give a code a narrower meaning say so in their own epilog.
EXIT_TABLE: Mapping[Exit, str] = {
    Exit.OK: "success",
    Exit.NO: "the answer is no: `why` not admitted (or another table may drop it), `doctor`"
    " warnings only, `check-config` the file is invalid",
    Exit.USAGE: "usage error: unknown command or option, a missing or malformed argument, a"
    " setting or input file on this side that cannot be used (nothing was sent)",
    Exit.REFUSED: "refused: the daemon or agent answered with an error and changed nothing; its"
    " reason word is printed (invalid_address, rate_limited, bad_signature ...)",
    Exit.UNREACHABLE: "unreachable: no answer (daemon not running, wrong socket or target, no"
    " permission on the socket, TLS failed, timed out); a change's outcome is unknown",
    Exit.PROBLEMS: "`doctor`: problems found",
    Exit.INTERRUPTED: "interrupted (Ctrl-C)",
}


def exit_epilog(
    codes: Sequence[Exit],
    meanings: Mapping[Exit, str] | None = None,
    *,
    heading: str = "exit status:",
    footer: str = "",
) -> str:
    """The ``exit status`` block of a command's ``--help`` (and so of the man page): its codes,
    words from the one table or the command's narrower ``meanings``, then the error shape."""
    own = meanings or {}
    lines = [heading]
    for code in codes:
        text = (own.get(code) or EXIT_TABLE[code]).replace("`", "")
        lines.append(
            textwrap.fill(
                text, width=78, initial_indent=f"  {int(code):>3}  ", subsequent_indent=" " * 7
            )
        )
    if footer:
        lines.append(footer)
    lines.append("errors: one line on stderr; with --json one JSON object on stdout:")
    lines.append('  {"error": {"reason": ..., "detail": ..., "code": ..., "exit_code": ...}}')
    return "\n".join(lines)


def exit_table_markdown() -> str:
    """The table for the README (a unit test keeps the README's copy equal to it)."""
    rows = ["| exit code | meaning |", "| --- | --- |"]
    rows += [f"| {int(code)} | {text} |" for code, text in EXIT_TABLE.items()]
    return "\n".join(rows)


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a command has no result: what it prints and the exit code it returns."""

    reason: str
    detail: str
    exit_code: Exit
    code: str | None = None  # the gRPC status name the agent answered with
    extra: Mapping[str, Any] = field(default_factory=dict)
    hint: str = ""

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "reason": self.reason,
            "detail": self.detail,
            "code": self.code,
            "exit_code": int(self.exit_code),
            **self.extra,
        }
        if self.hint:
            body["hint"] = self.hint
        return {"error": body}

    def line(self) -> str:
        code = f" [{self.code}]" if self.code else ""
        detail = f": {self.detail}" if self.detail else ""
        return f"vicifast-agent: error: {self.reason}{detail}{code}"


def report(failure: Failure, *, json_output: bool) -> int:
    """Print ``failure`` the one way every command does; return its exit code."""
    if json_output:
        print(json.dumps(failure.to_json()), flush=True)
    else:
        print(failure.line(), file=sys.stderr, flush=True)
        if failure.hint:
            print(f"hint: {failure.hint}", file=sys.stderr, flush=True)
    return int(failure.exit_code)


class UsageError(SystemExit):
    """argparse's complaint, raised instead of printed so the caller can report it the one way
    (JSON under ``--json``). A ``SystemExit`` with code 2, so code that parses without catching it
    still exits as argparse would."""

    def __init__(self, message: str, usage: str) -> None:
        super().__init__(Exit.USAGE)
        self.message = message
        self.usage = usage

    def failure(self) -> Failure:
        return Failure("usage", self.message, Exit.USAGE)


class CliParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors become ``UsageError`` (exit 2)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self.format_usage())
