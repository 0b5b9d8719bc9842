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
import time
from collections.abc import Callable
from typing import Any, Protocol

import nftables  # Debian's python3-nftables

from agent.errors import AgentError, KernelError, SetFull

_libc = ctypes.CDLL(None)
_errno_location = _libc.__errno_location
_errno_location.restype = ctypes.POINTER(ctypes.c_int)

# glibc keeps the heap a big call used (jansson's parse tree and nft's expressions: ~150 MB for
# 100k elements) mapped after libnftables freed it, so one large batch or listing would pin the
# daemon's RSS for good. malloc_trim hands the free pages back (~17 ms after a 100k batch), so it
# runs only after calls that moved this much JSON or took this long. glibc only.
RELEASE_AFTER_BYTES = 1 << 20
RELEASE_AFTER_SECONDS = 0.05
_malloc_trim = getattr(_libc, "malloc_trim", None)
# nft 1.0.6 fetches every element of every set into its cache for most list commands, even for
# a short answer such as `list counters` (~1 s and +40-80 MB with 100k entries); `list chains`
# is one of the few that does not.
_SMALL_LISTING = '{"nftables":[{"list":{"chains":{"family":"inet"}}}]}'

# Errors that mean "the batch disagreed with what is in the set": an element to delete expired
# meanwhile (ENOENT) or an element to create is already there (EEXIST). The caller re-reads the
# kernel and recomputes; nothing was changed.
CONFLICT_ERRNOS = frozenset({errno_codes.ENOENT, errno_codes.EEXIST})


class ElementConflict(KernelError):
    """The batch raced the kernel's view of a set (ENOENT/EEXIST); nothing was changed."""


# Told the duration of every transaction and its error (None when it committed); must not raise.
TransactionObserver = Callable[[float, AgentError | None], None]


class NftContext(Protocol):
    # The binding answers in the type it was given: str for a str command, bytes for bytes.
    def cmd(self, cmdline: str | bytes) -> tuple[int, str | bytes, str | bytes]: ...
    def set_json_output(self, val: bool) -> bool: ...
    def set_terse_output(self, val: bool) -> bool: ...


def _current_errno() -> int:
    return int(_errno_location()[0])


def _reset_errno() -> None:
    _errno_location()[0] = 0


_M_ARENA_MAX = -8  # mallopt's parameter number (glibc malloc.h)


def limit_heap_arenas(count: int) -> None:
    """Let glibc keep at most ``count`` heaps. By default each of the gRPC worker threads may get
    its own, and what a large batch frees stays scattered across them: with 2, a 100,000-entry
    Sync leaves ~30 MB less behind and peaks ~30 MB lower, at no measurable cost in
    throughput. Call before the threads start. glibc only."""
    mallopt = getattr(_libc, "mallopt", None)
    if mallopt is not None:
        mallopt(_M_ARENA_MAX, count)


def release_free_memory() -> None:
    """Return the process's free heap pages to the kernel (after a large batch or listing)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def _detail(err_text: str | bytes) -> str:
    text = err_text.decode(errors="replace") if isinstance(err_text, bytes) else err_text
    return " ".join(text.split())[:500]


# Every reason word ``classify_failure`` can give (the metrics start each at 0).
FAILURE_REASONS = ("set_full", "element_conflict", "kernel_refused")


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

    def __init__(
        self,
        context_factory: Callable[[], NftContext] | None = None,
        *,
        observe: TransactionObserver | None = None,
    ) -> None:
        factory = context_factory or nftables.Nftables
        self._ctx = factory()
        self._ctx.set_json_output(True)
        self._lock = threading.Lock()
        self.observe = observe

    def apply(self, batch: str | bytes) -> None:
        """Run ``batch`` (libnftables JSON text) as one transaction, or raise a ``KernelError``.

        Large batches are best passed as UTF-8 bytes the caller holds no str of: the binding
        encodes a str to a second copy for the call (libnftables makes a third).
        """
        with self._lock:
            started = time.monotonic()
            _reset_errno()
            rc, _out, err_text = self._ctx.cmd(batch)
            err = _current_errno()
            elapsed = time.monotonic() - started
        if len(batch) >= RELEASE_AFTER_BYTES:
            release_free_memory()
        failure = classify_failure(err, _detail(err_text)) if rc != 0 else None
        if self.observe is not None:
            self.observe(elapsed, failure)
        if failure is not None:
            raise failure

    def query(self, command: dict[str, Any], *, terse: bool = False) -> list[dict[str, Any]]:
        """Run a ``list`` command and return the ``nftables`` array without its metainfo.

        A missing object is ENOENT; callers decide whether that means "absent" or "broken".
        """
        text = json.dumps({"nftables": [command]})
        with self._lock:
            self._ctx.set_terse_output(terse)
            try:
                started = time.monotonic()
                _reset_errno()
                rc, out, err_text = self._ctx.cmd(text)
                err = _current_errno()
                heavy = (
                    len(out) >= RELEASE_AFTER_BYTES
                    or time.monotonic() - started >= RELEASE_AFTER_SECONDS
                )
                if heavy:
                    # libnftables keeps what it fetched (possibly every element) cached until
                    # its next command; a small one now lets the trim below return that memory
                    # too. The next real command fetches what it needs either way.
                    self._ctx.cmd(_SMALL_LISTING)
            finally:
                self._ctx.set_terse_output(False)
        if rc != 0:
            raise classify_failure(err, _detail(err_text))
        if heavy:
            # Before parsing: Python's object arenas cannot reuse the heap libnftables freed, so
            # trimming first keeps the parse tree from stacking on top of it (-55 MB at 100k).
            release_free_memory()
        items: list[dict[str, Any]] = json.loads(out)["nftables"] if out else []
        return [i for i in items if "metainfo" not in i]

    def metainfo(self) -> dict[str, Any]:
        """libnftables' own version record, from a small listing."""
        with self._lock:
            rc, out, _ = self._ctx.cmd(_SMALL_LISTING)
        if rc != 0 or not out:
            return {}
        for item in json.loads(out)["nftables"]:
            if "metainfo" in item:
                return dict(item["metainfo"])
        return {}
