"""The local socket's client: one connection, one JSON line each way (``agent.local.wire``).

Used by the sysadmin's CLI; a local fallback portal can use it as it is. It changes nothing
itself: everything it asks is done (or refused) by the daemon.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from agent.local.wire import LocalCallError, LocalRequest, decode_answer

__all__ = ["LocalCallError", "LocalClient", "LocalUnreachable"]


class LocalUnreachable(Exception):
    """No daemon answers on the socket (missing, refused, not permitted, timed out)."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class LocalClient:
    def __init__(self, path: Path, *, timeout: float = 60.0) -> None:
        self.path = path
        self.timeout = timeout

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one request and return its result, or raise ``LocalCallError``."""
        request = LocalRequest(op, args)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            try:
                sock.connect(str(self.path))
            except FileNotFoundError as exc:
                raise LocalUnreachable(
                    self.path, "no such socket (is the daemon running?)"
                ) from exc
            except PermissionError as exc:
                raise LocalUnreachable(
                    self.path, "permission denied (root or the [local] group only)"
                ) from exc
            except OSError as exc:
                raise LocalUnreachable(self.path, exc.strerror or type(exc).__name__) from exc
            try:
                sock.sendall(request.encode())
                sock.shutdown(socket.SHUT_WR)
                with sock.makefile("rb") as answers:
                    line = answers.readline()
            except TimeoutError as exc:
                raise LocalUnreachable(self.path, f"no answer within {self.timeout} s") from exc
            except OSError as exc:
                raise LocalUnreachable(self.path, exc.strerror or type(exc).__name__) from exc
        if not line:
            raise LocalUnreachable(self.path, "the daemon closed the connection without answering")
        return decode_answer(line)
