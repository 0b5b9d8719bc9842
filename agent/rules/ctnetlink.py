"""The one ctnetlink dump and delete the flow cutter needs, on a plain netlink socket.

Owns the socket and the parsing of what a dump returns, reading only the original and reply
source addresses, the flow's id, zone and original tuple (kept as the kernel sent it). pyroute2
parses every attribute of every flow (~0.2 ms each): a dump of 5,000 flows held the GIL for a
second, which every other thread of the daemon waited for. This reads a flow in ~15 us. Never
deletes a flow it was not given from a dump: a delete names the flow by its original tuple and
its id, so a flow re-created with the same tuple since the dump is not taken (ENOENT).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3
NLA_TYPE_MASK = 0x3FFF

CTA_TUPLE_ORIG = 1
CTA_TUPLE_REPLY = 2
CTA_ID = 12
CTA_ZONE = 18
CTA_TUPLE_IP = 1
CTA_IP_V4_SRC = 1
CTA_IP_V6_SRC = 3

_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("=BBH")
_NLA = struct.Struct("=HH")
_ERRNO = struct.Struct("=i")
RECV_BYTES = 1 << 20

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Flow:
    """One flow of a dump: its sources and what names it exactly in a delete."""

    orig_source: IPAddress | None
    reply_source: IPAddress | None
    key: bytes  # the CTA_TUPLE_ORIG, CTA_ID and CTA_ZONE attributes as the kernel sent them


def _attrs(data: memoryview) -> Iterator[tuple[int, memoryview, memoryview]]:
    """(type, payload, the whole attribute) of each attribute in ``data``."""
    offset, end = 0, len(data)
    while offset + 4 <= end:
        length, kind = _NLA.unpack_from(data, offset)
        if length < 4 or offset + length > end:
            return
        yield (
            kind & NLA_TYPE_MASK,
            data[offset + 4 : offset + length],
            data[offset : offset + length],
        )
        offset += (length + 3) & ~3


def _source(tuple_attr: memoryview) -> IPAddress | None:
    for kind, payload, _ in _attrs(tuple_attr):
        if kind == CTA_TUPLE_IP:
            for ip_kind, ip, _ in _attrs(payload):
                if ip_kind in (CTA_IP_V4_SRC, CTA_IP_V6_SRC):
                    return ipaddress.ip_address(bytes(ip))
    return None


def _flow(body: memoryview) -> Flow:
    orig = reply = None
    key = b""
    for kind, payload, whole in _attrs(body):
        if kind == CTA_TUPLE_ORIG:
            orig = _source(payload)
            key += whole.tobytes() + b"\0" * (-len(whole) % 4)
        elif kind == CTA_TUPLE_REPLY:
            reply = _source(payload)
        elif kind in (CTA_ID, CTA_ZONE):
            key += whole.tobytes() + b"\0" * (-len(whole) % 4)
    return Flow(orig, reply, key)


class CtNetlink:
    """A ctnetlink socket of one address family (``socket.AF_INET`` or ``AF_INET6``)."""

    def __init__(self, family: int) -> None:
        self.family = family
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self._sock.bind((0, 0))
        except OSError:
            self._sock.close()
            raise
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> CtNetlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, msg_type: int, flags: int, payload: bytes = b"") -> int:
        self._seq += 1
        body = _NFGENMSG.pack(self.family, 0, 0) + payload
        kind = (NFNL_SUBSYS_CTNETLINK << 8) | msg_type
        self._sock.send(_NLMSGHDR.pack(16 + len(body), kind, flags, self._seq, 0) + body)
        return self._seq

    def _messages(self, seq: int) -> Iterator[tuple[int, memoryview]]:
        """(type, payload after the nlmsghdr) of the answers to ``seq`` until DONE or an ack;
        an error answer raises ``OSError`` with its errno."""
        while True:
            data = memoryview(self._sock.recv(RECV_BYTES))
            offset = 0
            while offset + 16 <= len(data):
                length, kind, _flags, got_seq, _pid = _NLMSGHDR.unpack_from(data, offset)
                if length < 16:
                    return
                payload = data[offset + 16 : offset + length]
                offset += (length + 3) & ~3
                if got_seq != seq:
                    continue  # a late answer to an earlier request
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR:
                    (code,) = _ERRNO.unpack_from(payload, 0)
                    if code:
                        raise OSError(-code, errno.errorcode.get(-code, "netlink error"))
                    return  # the ack of a request that succeeded
                yield kind, payload

    def dump(self) -> Iterator[Flow]:
        """Every flow of the family, each read as the kernel sends it."""
        seq = self._send(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP)
        for _kind, payload in self._messages(seq):
            yield _flow(payload[_NFGENMSG.size :])

    def delete(self, flow: Flow) -> None:
        """Delete ``flow``; ``OSError`` (ENOENT: it is gone, or was re-created since)."""
        seq = self._send(IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, flow.key)
        for _ in self._messages(seq):
            pass
