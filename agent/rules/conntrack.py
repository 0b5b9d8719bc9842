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
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pyroute2 import Conntrack
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

from agent.model import Address

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ForgetResult:
    deleted: int
    failed: int


def _tuple_addr(entry: Any, which: str) -> str | None:
    tup = getattr(entry, which, None)
    return getattr(tup, "saddr", None) if tup is not None else None


def _names(entry: Any, addresses: list[Address]) -> bool:
    for which in ("tuple_orig", "tuple_reply"):
        text = _tuple_addr(entry, which)
        if not text:
            continue
        ip = ipaddress.ip_address(text)
        if any(ip.version == a.family and ip in a.network for a in addresses):
            return True
    return False


def forget_flows(addresses: Iterable[Address]) -> ForgetResult:
    """Delete every conntrack entry whose original or reply source is one of ``addresses``."""
    targets = list(addresses)
    if not targets:
        return ForgetResult(0, 0)
    deleted = failed = 0
    for family in sorted({a.family for a in targets}):
        d, f = _forget_family(family, [a for a in targets if a.family == family])
        deleted += d
        failed += f
    return ForgetResult(deleted, failed)


def _forget_family(family: int, targets: list[Address]) -> tuple[int, int]:
    """(deleted, failed) among the flows of one address family (``targets`` are all of it)."""
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    # One socket per family: ctnetlink answers a dump only with flows of the message's
    # nfgen_family and parses a delete's tuple by it, and pyroute2 defaults it to AF_INET.
    try:
        ct = Conntrack(nfgen_family=af)
    except (OSError, NetlinkError) as exc:
        log.warning("conntrack unavailable, flows of revoked sources not cut: %s", exc)
        return 0, len(targets)
    deleted = failed = 0
    try:
        # The kernel cannot filter by prefix, and a /64 entry must cut every address inside it:
        # dump the family's flows and match here.
        for entry in list(ct.dump_entries(tuple_orig=NFCTAttrTuple(family=af))):
            if not _names(entry, targets):
                continue
            try:
                ct.delete(entry)
                deleted += 1
            except NetlinkError:
                failed += 1  # gone by itself meanwhile, or refused: nothing to undo
    except (OSError, NetlinkError) as exc:
        log.warning("conntrack dump failed, flows of revoked sources may persist: %s", exc)
        failed += 1
    finally:
        ct.close()
    return deleted, failed
