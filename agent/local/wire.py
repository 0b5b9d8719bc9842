"""Pure: the local socket's messages, one JSON object per line, UTF-8.

Request::   {"op": "allow", "args": {"addresses": ["198.51.100.7"], "ttl": 600}}
Answer::    {"ok": true, "result": {...}}
Refusal::   {"ok": false, "error": {"kind": "invalid_argument", "reason": "invalid_ttl",
                                    "detail": "..."}}

``kind`` is an ``agent.errors.ErrorKind`` value and ``reason`` the stable reason word, the same
vocabulary the gRPC API uses; callers match on those, never on ``detail``. A connection may
carry several requests, answered in order. This module does no I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from agent.errors import AgentError, ErrorKind, InvalidArgument

MAX_REQUEST_BYTES = 64 * 1024
OPS = ("status", "list", "allow", "revoke", "doctor", "why", "audit", "reload")
CHANGING_OPS = frozenset({"allow", "revoke"})


@dataclass(frozen=True, slots=True)
class LocalRequest:
    op: str
    args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise InvalidArgument("unknown_op", f"{self.op!r} is not one of {', '.join(OPS)}")

    def encode(self) -> bytes:
        return json.dumps({"op": self.op, "args": self.args}).encode() + b"\n"


def decode_request(line: bytes) -> LocalRequest:
    """Parse one request line or raise ``InvalidArgument`` (``bad_request``/``unknown_op``)."""
    try:
        data = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument("bad_request", "a request is one JSON object per line") from exc
    if not isinstance(data, dict) or not isinstance(data.get("op"), str):
        raise InvalidArgument("bad_request", 'a request needs "op" (a string)')
    args = data.get("args", {})
    if not isinstance(args, dict):
        raise InvalidArgument("bad_request", '"args" must be an object')
    return LocalRequest(data["op"], args)


def encode_result(result: dict[str, Any]) -> bytes:
    return json.dumps({"ok": True, "result": result}).encode() + b"\n"


def encode_error(exc: AgentError) -> bytes:
    error = {"kind": exc.kind.value, "reason": exc.reason, "detail": exc.detail}
    return json.dumps({"ok": False, "error": error}).encode() + b"\n"


class LocalCallError(Exception):
    """The daemon refused a local request: its error kind, reason word and detail."""

    def __init__(self, kind: ErrorKind, reason: str, detail: str) -> None:
        self.kind = kind
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


def decode_answer(line: bytes) -> dict[str, Any]:
    """The result of an answer line, or ``LocalCallError`` for a refusal."""
    data = json.loads(line)
    if data.get("ok"):
        result: dict[str, Any] = data["result"]
        return result
    err = data.get("error", {})
    try:
        kind = ErrorKind(err.get("kind"))
    except ValueError:
        kind = ErrorKind.INTERNAL
    raise LocalCallError(kind, str(err.get("reason", "internal")), str(err.get("detail", "")))


def arg_str(args: dict[str, Any], name: str, default: str = "") -> str:
    value = args.get(name, default)
    if not isinstance(value, str):
        raise InvalidArgument("bad_request", f"{name!r} must be a string")
    return value


def arg_int(args: dict[str, Any], name: str, default: int = 0) -> int:
    value = args.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidArgument("bad_request", f"{name!r} must be a non-negative integer")
    return value


def arg_strings(args: dict[str, Any], name: str) -> list[str]:
    value = args.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument("bad_request", f"{name!r} must be a list of strings")
    return value
