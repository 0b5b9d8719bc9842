"""pyroute2 adapter: forget the conntrack flows of revoked sources.

Why this exists although the chain has no ``ct state established`` shortcut: the chain accepts
``ct direction reply`` so that replies to connections the *host* initiated pass (trunk
registrations, DNS, apt). A revoked source can still be the reply side of a live conntrack entry
- Asterisk qualifying a registered softphone (OPTIONS from 5060 to the phone), a WebRTC ICE
check, or a UDP entry that the host's own traffic re-originated after the phone's entry timed
out. Its packets then match ``ct direction reply`` and bypass the allow sets. Deleting every
entry that names the source, on either side, removes that standing at once: its next packet opens
a new original-direction entry and meets the sets.

Never raises into the caller: the kernel sets have already changed when this runs, and a revoke
must not be reported failed because conntrack was unavailable; failures are returned as a count.
Each delete goes through the caller's ``guard``, which may spare a flow (see ``agent.flowcuts``:
a source allowed again since the cut was asked for keeps its flows).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from pyroute2 import Conntrack, IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

from agent.model import Address
from agent.rules.ctnetlink import CtNetlink

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ForgetResult:
    """``deleted``: flows cut. ``failed``: cuts that did not happen - a delete the kernel
    refused, a dump that broke off (one), or, with conntrack unavailable, one per address. A
    flow that ended by itself before its delete is neither."""

    deleted: int
    failed: int
    spared: int = 0  # flows the guard kept: their source was allowed again meanwhile


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# Called with the sources a flow names (original, reply) right before its delete; the delete
# happens inside the returned context, and only if it yields True.
Guard = Callable[[Sequence[IPAddress | None]], AbstractContextManager[bool]]


def unguarded(sources: Sequence[IPAddress | None]) -> AbstractContextManager[bool]:
    """The guard that deletes every flow it is asked about."""
    return nullcontext(True)


# Up to this many single addresses of a family are looked up by the kernel (two filtered dumps
# each, ~10 ms of kernel time per dump with 262,144 buckets); more, or any /64, take one dump
# of the family's flows (one walk, ~15 us per flow read in agent.rules.ctnetlink), matched here.
FILTERED_LOOKUPS_MAX = 2


@dataclass(frozen=True, slots=True)
class _Sources:
    """The revoked sources of one family, matched in constant time per flow: a Sync can revoke
    100,000 addresses while the host has thousands of flows.

    The host's own addresses (``local``) never match: the reply source of every flow coming in
    is one of them, and a revoked /64 may be the host's own subnet (an office LAN), which would
    otherwise cut every flow of the family.
    """

    local: frozenset[IPAddress]
    exact: frozenset[IPAddress]
    prefixes: dict[int, frozenset[IPNetwork]]  # by prefix length

    @classmethod
    def of(cls, targets: list[Address], local: set[IPAddress]) -> _Sources:
        nets = [a.network for a in targets]
        lengths = {n.prefixlen for n in nets if n.prefixlen < n.max_prefixlen}
        return cls(
            local=frozenset(local),
            exact=frozenset(n.network_address for n in nets if n.prefixlen == n.max_prefixlen),
            prefixes={n: frozenset(net for net in nets if net.prefixlen == n) for n in lengths},
        )

    def match(self, ip: IPAddress | None) -> bool:
        if ip is None or ip in self.local:
            return False
        if ip in self.exact:
            return True
        return any(
            ipaddress.ip_network((ip, length), strict=False) in nets
            for length, nets in self.prefixes.items()
        )


def _source(entry: Any, which: str) -> IPAddress | None:
    tup = getattr(entry, which, None)
    text = getattr(tup, "saddr", None) if tup is not None else None
    return ipaddress.ip_address(text) if text else None


def _names(entry: Any, sources: _Sources) -> bool:
    return sources.match(_source(entry, "tuple_orig")) or sources.match(
        _source(entry, "tuple_reply")
    )


def forget_flows(addresses: Iterable[Address], guard: Guard = unguarded) -> ForgetResult:
    """Delete every conntrack entry whose original or reply source is one of ``addresses`` and
    that ``guard`` lets go."""
    targets = list(dict.fromkeys(addresses))  # one address may leave several profiles
    if not targets:
        return ForgetResult(0, 0)
    deleted = failed = spared = 0
    for family in sorted({a.family for a in targets}):
        d, f, s = _forget_family(family, [a for a in targets if a.family == family], guard)
        deleted += d
        failed += f
        spared += s
    return ForgetResult(deleted, failed, spared)


def _forget_family(family: int, targets: list[Address], guard: Guard) -> tuple[int, int, int]:
    """(deleted, failed, spared) among the flows of one address family (``targets`` are all of
    it)."""
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    if not _filtered(targets):
        return _forget_by_dump(af, targets, guard)
    # One socket per family: ctnetlink answers a dump only with flows of the message's
    # nfgen_family and parses a delete's tuple by it, and pyroute2 defaults it to AF_INET.
    try:
        ct = Conntrack(nfgen_family=af)
    except (OSError, NetlinkError) as exc:
        log.warning("conntrack unavailable, flows of revoked sources not cut: %s", exc)
        return 0, len(targets), 0
    sources = _Sources.of(targets, _local_addresses(af))
    deleted = failed = spared = 0
    try:
        for entry in _candidates(ct, af, targets, sources):
            if not _names(entry, sources):  # also what the kernel's filter already ensured
                continue
            with guard((_source(entry, "tuple_orig"), _source(entry, "tuple_reply"))) as go:
                if not go:
                    spared += 1
                    continue
                try:
                    ct.delete(entry)
                    deleted += 1
                except NetlinkError as exc:
                    # Nothing to undo either way; a flow that timed out meanwhile is no failure.
                    if exc.code != errno.ENOENT:
                        failed += 1
    except (OSError, NetlinkError) as exc:
        log.warning("conntrack dump failed, flows of revoked sources may persist: %s", exc)
        failed += 1
    finally:
        ct.close()
    return deleted, failed, spared


def _filtered(targets: list[Address]) -> bool:
    """Whether the kernel is to look ``targets`` up (see ``_candidates``)."""
    return len(targets) <= FILTERED_LOOKUPS_MAX and not any("/" in a.text for a in targets)


def _forget_by_dump(af: int, targets: list[Address], guard: Guard) -> tuple[int, int, int]:
    """(deleted, failed, spared): one dump of the family's flows, matched here."""
    try:
        ct = CtNetlink(af)
    except OSError as exc:
        log.warning("conntrack unavailable, flows of revoked sources not cut: %s", exc)
        return 0, len(targets), 0
    sources = _Sources.of(targets, _local_addresses(af))
    deleted = failed = spared = 0
    with ct:
        try:
            # The whole dump first: a delete's answer must not come amid the dump's.
            named = [
                f
                for f in ct.dump()
                if sources.match(f.orig_source) or sources.match(f.reply_source)
            ]
        except OSError as exc:
            log.warning("conntrack dump failed, flows of revoked sources may persist: %s", exc)
            return 0, 1, 0
        for flow in named:
            with guard((flow.orig_source, flow.reply_source)) as go:
                if not go:
                    spared += 1
                    continue
                try:
                    ct.delete(flow)
                    deleted += 1
                except OSError as exc:
                    if exc.errno != errno.ENOENT:  # gone meanwhile: no failure
                        failed += 1
    return deleted, failed, spared


def _local_addresses(af: int) -> set[IPAddress]:
    try:
        with IPRoute() as ipr:
            texts = [a.get("IFA_ADDRESS") for a in ipr.get_addr(family=af)]
        return {ipaddress.ip_address(text) for text in texts if text}
    except (OSError, NetlinkError) as exc:
        log.warning("cannot list the host's addresses, flows are matched without them: %s", exc)
        return set()


def _candidates(ct: Conntrack, af: int, targets: list[Address], sources: _Sources) -> list[Any]:
    """The flows that may name ``targets``, each once.

    Parsing a flow costs pyroute2 ~0.2 ms, so a dump of every flow made each revoke take 0.9 s
    of the writer on a host with 5,000 flows. For a few single addresses the kernel filters the
    dump instead (CTA_FILTER, Linux 5.8+): one dump where the address is the original source,
    one where it is the reply source (flows the host initiated). A dump costs a walk over the
    conntrack hash table either way (~10 ms with 262,144 buckets). The kernel cannot match a
    prefix, so /64 entries and long lists fall back to one dump of the family, matched here.
    Every flow returned is matched here too, so a kernel that ignores the filter costs time,
    not correctness; one that refuses it gets the single dump.
    """
    if _filtered(targets):
        try:
            return _looked_up(ct, af, targets, sources)
        except NetlinkError as exc:  # a kernel that refuses the filter: match every flow here
            log.info("conntrack dump filter refused (%s); matching every flow", exc)
    return list(ct.dump_entries(tuple_orig=NFCTAttrTuple(family=af)))


def _looked_up(ct: Conntrack, af: int, targets: list[Address], sources: _Sources) -> list[Any]:
    found: list[Any] = []
    for a in targets:
        if ipaddress.ip_address(a.text) in sources.local:
            continue  # never the revoked source (see _Sources), and the filter would take all
        found += ct.dump_entries(tuple_orig=NFCTAttrTuple(family=af, saddr=a.text))
        # Seen in the first dump already when the address is the original source too.
        found += (
            e
            for e in ct.dump_entries(tuple_reply=NFCTAttrTuple(family=af, saddr=a.text))
            if not sources.match(_source(e, "tuple_orig"))
        )
    return found
