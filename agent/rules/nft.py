"""The one adapter over python-nftables (libnftables' own binding): JSON in, typed errors out.

Every ``apply`` is one libnftables call and therefore one kernel transaction: it lands whole or
not at all. It never decides what to send; callers hand it rendered batches.

Errors are classified by the kernel's errno, never by message text. The binding returns only
``rc`` and text, but libnftables leaves the errno of the failing netlink ACK in the C ``errno``
of the calling thread, so it is read right after the call (nothing in between makes a syscall).
When libnftables failed before talking to the kernel (JSON it could not parse) that value is
meaningless; such batches are a bug of ours and end up as ``kernel_refused`` after the bounded
retries of the caller.

Large batches: libnftables splits the elements over as many netlink messages as needed between
one BATCH_BEGIN and one BATCH_END and enlarges the socket's send buffer to hold them, so the
kernel still commits or aborts the batch as a whole (tested with 100,000 elements).
"""

from __future__ import annotations

import ctypes
import errno as errno_codes
import json
import threading
from collections.abc import Callable
from typing import Any, Protocol

import nftables  # Debian's python3-nftables

from agent.errors import AgentError, KernelError, SetFull

_libc = ctypes.CDLL(None)
_errno_location = _libc.__errno_location
_errno_location.restype = ctypes.POINTER(ctypes.c_int)

# Errors that mean "the batch disagreed with what is in the set": an element to delete expired
# meanwhile (ENOENT) or an element to create is already there (EEXIST). The caller re-reads the
# kernel and recomputes; nothing was changed.
CONFLICT_ERRNOS = frozenset({errno_codes.ENOENT, errno_codes.EEXIST})


class ElementConflict(KernelError):
    """The batch raced the kernel's view of a set (ENOENT/EEXIST); nothing was changed."""


class NftContext(Protocol):
    def cmd(self, cmdline: str) -> tuple[int, str, str]: ...
    def set_json_output(self, val: bool) -> bool: ...
    def set_terse_output(self, val: bool) -> bool: ...


def _current_errno() -> int:
    return int(_errno_location()[0])


def _reset_errno() -> None:
    _errno_location()[0] = 0


def classify_failure(err: int, detail: str) -> AgentError:
    """Turn a failed transaction's errno into the typed error the layers above branch on."""
    if err == errno_codes.ENFILE:
        return SetFull(f"a set is at its configured size: {detail}")
    if err in CONFLICT_ERRNOS:
        return ElementConflict("element_conflict", err, detail)
    name = errno_codes.errorcode.get(err, str(err))
    return KernelError("kernel_refused", err, f"{name}: {detail}")


class NftAdapter:
    """Serialises access to one libnftables context (it is not thread-safe)."""

    def __init__(self, context_factory: Callable[[], NftContext] | None = None) -> None:
        factory = context_factory or nftables.Nftables
        self._ctx = factory()
        self._ctx.set_json_output(True)
        self._lock = threading.Lock()

    def apply(self, batch: str) -> None:
        """Run ``batch`` (libnftables JSON text) as one transaction, or raise a ``KernelError``."""
        with self._lock:
            _reset_errno()
            rc, _out, err_text = self._ctx.cmd(batch)
            err = _current_errno()
        if rc != 0:
            raise classify_failure(err, " ".join(err_text.split())[:500])

    def query(self, command: dict[str, Any], *, terse: bool = False) -> list[dict[str, Any]]:
        """Run a ``list`` command and return the ``nftables`` array without its metainfo.

        A missing object is ENOENT; callers decide whether that means "absent" or "broken".
        """
        text = json.dumps({"nftables": [command]})
        with self._lock:
            self._ctx.set_terse_output(terse)
            try:
                _reset_errno()
                rc, out, err_text = self._ctx.cmd(text)
                err = _current_errno()
            finally:
                self._ctx.set_terse_output(False)
        if rc != 0:
            raise classify_failure(err, " ".join(err_text.split())[:500])
        items: list[dict[str, Any]] = json.loads(out)["nftables"] if out else []
        return [i for i in items if "metainfo" not in i]

    def metainfo(self) -> dict[str, Any]:
        """libnftables' own version record, from an empty listing."""
        with self._lock:
            rc, out, _ = self._ctx.cmd('{"nftables":[{"list":{"tables":{"family":"inet"}}}]}')
        if rc != 0 or not out:
            return {}
        for item in json.loads(out)["nftables"]:
            if "metainfo" in item:
                return dict(item["metainfo"])
        return {}
