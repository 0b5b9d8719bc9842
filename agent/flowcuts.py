"""The flow cutter: cuts the conntrack flows of revoked sources on a thread of its own, so the
writer never waits for a walk over the conntrack table, and a source allowed again keeps the
flows it opens after its new Allow.

Owns its queue, its thread, its totals and the record of sources allowed while cuts are
outstanding. Never changes the allow state or the sets, and never raises into the writer: a cut
that breaks is logged with a reason word, counted, and the thread goes on with the next one.

The ordering rule (a re-Allow must not lose its fresh flows to a late cut): the writer calls
``allowing`` with a group's upserted sources *before* their kernel transaction, and ``cut`` with
its removed sources after the group is answered. A cut spares every flow naming a source allowed
after the cut was asked for. The check and the delete run under one lock that ``allowing``
takes as well, so once ``allowing`` has returned no delete of such a flow is under way or still
to come - and only after that can the Allow reach the kernel and a fresh flow of the source
exist (a packet the sets drop never confirms a conntrack entry of its own). The writer waits
for at most one netlink delete, and only while a cut is outstanding.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from agent.model import Address
from agent.rules.conntrack import ForgetResult, Guard, IPAddress, IPNetwork
from agent.supervise import HEARTBEAT_S, Supervision

log = logging.getLogger(__name__)
LOOP = "conntrack"  # the cutter thread's name among the supervised loops

CutFlows = Callable[[Sequence[Address], Guard], ForgetResult]
# A cut that breaks is retried by nobody; the thread waits this long before the next one, so a
# failure that repeats cannot spin.
FAILURE_PAUSE_S = 0.1


# After a cut the thread rests as long as the cut took (at most this long), so that cutting
# takes at most about half a core from the writer, and revokes that come meanwhile are cut
# together: each cut walks the kernel's conntrack table (~10 ms per walk with 262,144 buckets;
# two walks per address for up to 2 addresses, one walk and a read of every flow beyond that,
# see agent.rules.conntrack), so many revokes cost one walk, not two each. The least rest
# bounds the walks to about four a second whatever the rate of revokes (measured: sequential
# Revokes with a flow each, 129/s with a rest as long as the cut, 228/s with at least 0.1 s,
# ~350/s, as fast as Allows, with at least 0.25 s); a flow of a revoked source lives that much
# longer at most, and only its reply direction: the sets already drop the source's packets.
REST_MIN_S = 0.25
REST_MAX_S = 0.5


@dataclass(frozen=True, slots=True)
class _Cut:
    addresses: tuple[Address, ...]
    since: int  # the allow sequence number when the cut was asked for


@dataclass(frozen=True, slots=True)
class _Batch:
    """Queued cuts taken together: their addresses, and for each address's network the
    sequence number of its newest cut (an Allow after it spares the address's flows)."""

    addresses: tuple[Address, ...]
    since: dict[IPNetwork, int]
    lengths: frozenset[tuple[int, int]]
    cuts: int

    @classmethod
    def of(cls, cuts: list[_Cut]) -> _Batch:
        since: dict[IPNetwork, int] = {}
        for cut in cuts:
            for a in cut.addresses:
                since[a.network] = cut.since  # cuts come in order: the last is the newest
        lengths = frozenset((net.version, net.prefixlen) for net in since)
        addresses = tuple(dict.fromkeys(a for cut in cuts for a in cut.addresses))
        return cls(addresses, since, lengths, len(cuts))

    def cut_since(self, ip: IPAddress) -> int | None:
        """When the newest cut naming ``ip`` was asked for; None: no cut names it."""
        found = [
            self.since.get(ipaddress.ip_network((ip, length), strict=False))
            for version, length in self.lengths
            if version == ip.version
        ]
        known = [s for s in found if s is not None]
        return max(known) if known else None


class FlowCutter:
    """Cuts flows of revoked sources in the order they were revoked, one cut at a time."""

    def __init__(self, cut_flows: CutFlows, supervision: Supervision | None = None) -> None:
        self._cut_flows = cut_flows
        # The cutter's thread is the supervised loop "conntrack" (agent.supervise): it beats at
        # least every HEARTBEAT_S, and a cut that raises is counted as that loop's fault.
        self.supervision = supervision
        self._queue: queue.SimpleQueue[_Cut | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        # Networks allowed while a cut was outstanding, with the sequence number of their
        # newest Allow; cleared when no cut is outstanding.
        self._allowed: dict[IPNetwork, int] = {}
        self._lengths: set[tuple[int, int]] = set()  # (version, prefix length) in _allowed
        self._seq = 0
        # Cuts asked for and not finished. Only the writer adds to it, so a writer that reads 0
        # knows no cut older than its Allow can run.
        self._outstanding = 0
        self._idle = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()  # ends a rest at once
        # Totals since start, read by the metrics (only the cutter thread adds).
        self.flows_cut = 0
        self.failures = 0
        self.spared = 0
        self.errors = 0  # cuts that raised (a bug or a broken kernel interface)

    def start(self) -> None:
        if self.supervision is not None:
            self.supervision.watch(LOOP)
        self._thread = threading.Thread(target=self._run, name="flowcuts", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish the queued cuts, then stop the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._stopping.set()
            self._thread.join(timeout)
            self._thread = None
            if self.supervision is not None:
                self.supervision.unwatch(LOOP)

    # --- the writer's side -------------------------------------------------------------------

    def cut(self, addresses: Iterable[Address]) -> None:
        """Queue a cut of the flows of ``addresses`` (writer thread; returns at once)."""
        targets = tuple(dict.fromkeys(addresses))
        if not targets:
            return
        with self._lock:
            self._outstanding += 1
            job = _Cut(targets, self._seq)
        if self._thread is None:  # not started (tests, start-up): cut here
            self._work(job)
        else:
            self._queue.put(job)

    def allowing(self, addresses: Iterable[Address]) -> None:
        """Writer thread, before the kernel transaction that allows ``addresses``: no flow of
        theirs is deleted by a cut asked for before this call, from its return on."""
        if not self._outstanding:
            return
        with self._lock:
            self._seq += 1
            for a in addresses:
                net = a.network
                self._allowed[net] = self._seq
                self._lengths.add((net.version, net.prefixlen))

    def wait_idle(self, timeout: float) -> bool:
        """Whether every cut asked for has finished within ``timeout`` (tests, shutdown)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._outstanding == 0, timeout)

    # --- the cutter thread -------------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            try:
                first = self._queue.get(timeout=HEARTBEAT_S)
            except queue.Empty:
                self._idle_beat()
                continue
            if first is None:
                return
            cuts = [first]
            while True:  # every cut queued meanwhile goes with it
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                    break
                cuts.append(more)
            started = time.monotonic()
            self._work(_Batch.of(cuts))
            if not stopping:
                self._stopping.wait(min(REST_MAX_S, max(REST_MIN_S, time.monotonic() - started)))

    def _idle_beat(self) -> None:
        """No cut queued: the loop's turn is the fault-injection checkpoint and a beat."""
        if self.supervision is not None:
            pause = self.supervision.guarded(LOOP, lambda: None)
            if pause:
                self._stopping.wait(pause)

    def _work(self, batch: _Batch | _Cut) -> None:
        if isinstance(batch, _Cut):
            batch = _Batch.of([batch])
        try:
            result = self._cut_flows(batch.addresses, lambda ips: self._guard(batch, ips))
        except Exception as exc:  # supervised: logged, counted, the thread goes on
            if self.supervision is not None:
                self.supervision.fault(LOOP, exc)
            else:
                log.exception("flow cut failed", extra={"REASON": "flow_cut_crashed"})
            self.errors += 1
            self.failures += len(batch.addresses)
            time.sleep(FAILURE_PAUSE_S)
        else:
            if self.supervision is not None:
                self.supervision.beat(LOOP)
            self.flows_cut += result.deleted
            self.failures += result.failed
            self.spared += result.spared
        finally:
            with self._lock:
                self._outstanding -= batch.cuts
                if not self._outstanding:
                    self._allowed.clear()
                    self._lengths.clear()
                    self._idle.notify_all()

    @contextlib.contextmanager
    def _guard(self, batch: _Batch, sources: Sequence[IPAddress | None]) -> Iterator[bool]:
        with self._lock:  # held through the delete: see the module's ordering rule
            yield not any(self._allowed_after(batch, ip) for ip in sources if ip is not None)

    def _allowed_after(self, batch: _Batch, ip: IPAddress) -> bool:
        """Whether ``ip`` was allowed after the newest cut naming it was asked for."""
        if not self._allowed:
            return False
        since = batch.cut_since(ip)
        if since is None:
            return False  # the flow's other side (the host, a peer): not what the cut is for
        for version, length in self._lengths:
            if version == ip.version:
                net = ipaddress.ip_network((ip, length), strict=False)
                if self._allowed.get(net, -1) > since:
                    return True
        return False
