"""nf_tables over raw netlink: change notifications of the agent's table, and a cheap rule count.

Owns the netlink sockets the lifecycle needs besides libnftables: a listener on the
``NFNLGRP_NFTABLES`` multicast group (what ``nft monitor`` reads) and a one-shot rule dump of one
table. It only reads; it never changes the ruleset.

A committed transaction's notifications arrive before its ``NEWGEN`` message, whose header
names the netlink port of the socket that committed it. Each message is therefore folded into a
summary of its generation as it arrives (nothing is kept), and at the ``NEWGEN`` the summary is
reported as a ``Touch`` of the agent's table, or dropped when that port is a socket of this
process (``OwnSockets``); from the agent's first own transaction on, the later notifications of
that port are dropped unread. If the socket overflowed (ENOBUFS), what was lost is unknown and
the touch says so.

The committer is recognised by its socket, not by the thread id the NEWGEN also carries
(``NFTA_GEN_PROC_PID``): the kernel writes the thread's id as the initial PID namespace sees it
(``task_pid_nr``), so inside a container (LXC, nspawn, ``unshare --pid``) that id is not one
this process can see, and its own commits would look foreign (and a foreign committer's host
id could even match one of its own thread ids). Port ids are per network namespace, the same
from inside any PID namespace.

Even dropped unread, notifications cost: while anyone listens, the kernel builds one per element
of every commit, in the committer's time, and this process receives each (a 100,000-element
Sync paid about 0.7 s for news of itself). ``not_listening`` therefore leaves the group around
one large transaction of the agent's own, and proves afterwards from the ruleset generation that
nobody else committed meanwhile; if anyone may have, the next ``wait`` reports ``lost``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import select
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7
NFNL_SUBSYS_NFTABLES = 10
NFPROTO_INET = 1
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_DROP_MEMBERSHIP = 2
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300

NFT_MSG_NEWSETELEM = 12
NFT_MSG_DELSETELEM = 14
NFT_MSG_NEWGEN = 15
NFT_MSG_GETGEN = 16
NFT_MSG_GETRULE = 7
NFT_MSG_NEWRULE = 6
NFT_MSG_DESTROYSETELEM = 30
_ELEMENT_MSGS = frozenset({NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM, NFT_MSG_DESTROYSETELEM})
_SET_MSGS = frozenset({9, 11, 29})  # NEWSET, DELSET, DESTROYSET
# In every nf_tables object message attribute 1 names the table; in set and element messages
# attribute 2 names the set. NEWGEN: 1 generation id, 2 committing thread id, 3 its name.
_ATTR_TABLE = 1
_ATTR_SET = 2
_GEN_ID = 1
_GEN_PID = 2
# /proc/<tid>/net/netlink: one socket a line; the columns used (protocol, port id, inode).
_NETLINK_PROTOCOL, _NETLINK_PORT, _NETLINK_INODE = 1, 2, 9

_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("=BBH")
_NLATTR = struct.Struct("=HH")
_HEADER_LEN = _NLMSGHDR.size + _NFGENMSG.size
# A 100,000-element transaction queues its element notifications before its NEWGEN: 16 MiB
# overflowed (ENOBUFS, then a needless full read-back of every element), 64 MiB did not. Kernel
# memory, used only while notifications wait to be read.
RECEIVE_BUFFER = 128 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Touch:
    """What foreign transactions did to the agent's table since the last report."""

    structure: bool = False  # the table, a chain, rule, set or object came or went
    sets: frozenset[str] = frozenset()  # sets whose elements were added or deleted
    lost: bool = False  # notifications were lost: anything may have changed
    elsewhere: bool = False  # another table changed (coexistence may have changed)

    @property
    def empty(self) -> bool:
        return not (self.structure or self.sets or self.lost or self.elsewhere)

    @property
    def ours(self) -> bool:
        """Whether the agent's own table may have been changed."""
        return bool(self.structure or self.sets or self.lost)

    def merge(self, other: Touch) -> Touch:
        return Touch(
            self.structure or other.structure,
            self.sets | other.sets,
            self.lost or other.lost,
            self.elsewhere or other.elsewhere,
        )


def _attrs(data: bytes, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    pos = start
    while pos + _NLATTR.size <= end:
        length, kind = _NLATTR.unpack_from(data, pos)
        if length < _NLATTR.size:
            return
        yield kind & 0x3FFF, data[pos + _NLATTR.size : pos + length]
        pos += (length + 3) & ~3


def _string(value: bytes) -> str:
    return value.split(b"\0", 1)[0].decode("utf-8", "replace")


def messages(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(nf_tables message type, start, end) of each message in one datagram."""
    pos = 0
    while pos + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, pos)
        if length < _NLMSGHDR.size:
            return
        if kind >> 8 == NFNL_SUBSYS_NFTABLES:
            yield kind & 0xFF, pos, pos + length
        pos += (length + 3) & ~3


def _generation_attr(data: bytes, start: int, end: int, attr: int) -> int:
    for kind, value in _attrs(data, start + _HEADER_LEN, end):
        if kind == attr and len(value) >= 4:
            return int(struct.unpack("!I", value[:4])[0])
    return 0


def generation_pid(data: bytes, start: int, end: int) -> int:
    """The committing thread a ``NEWGEN`` message names."""
    return _generation_attr(data, start, end, _GEN_PID)


def generation_id(data: bytes, start: int, end: int) -> int:
    """The generation a ``NEWGEN`` message announces."""
    return _generation_attr(data, start, end, _GEN_ID)


@dataclass(slots=True)
class GenerationSummary:
    """What the messages of one generation so far did to ``inet <table>``, folded in as they
    arrive, so that no message is kept until its generation's ``NEWGEN``."""

    table: str
    structure: bool = False
    elsewhere: bool = False
    sets: set[str] = field(default_factory=set)
    # The table attribute as the kernel puts it first in every message of our table: a
    # foreign bulk change (100,000 elements of another tool's set) is told apart by it alone.
    _own_table: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        name = self.table.encode() + b"\0"
        self._own_table = _NLATTR.pack(_NLATTR.size + len(name), _ATTR_TABLE) + name

    def add(self, data: bytes, kind: int, start: int, end: int) -> None:
        if kind == NFT_MSG_NEWGEN or end - start < _HEADER_LEN:
            return
        if data[start + _NLMSGHDR.size] != NFPROTO_INET or self._another_table(data, start, end):
            self.elsewhere = True
            return
        attrs = dict(_attrs(data, start + _HEADER_LEN, end))
        if _string(attrs.get(_ATTR_TABLE, b"")) != self.table:
            self.elsewhere = True
            return
        if kind in _ELEMENT_MSGS:
            self.sets.add(_string(attrs.get(_ATTR_SET, b"")))
        else:
            self.structure = True
            if kind in _SET_MSGS:
                self.sets.add(_string(attrs.get(_ATTR_SET, b"")))

    def _another_table(self, data: bytes, start: int, end: int) -> bool:
        """Whether the message's first attribute names a table other than ours."""
        pos = start + _HEADER_LEN
        if end - pos < _NLATTR.size or _NLATTR.unpack_from(data, pos)[1] & 0x3FFF != _ATTR_TABLE:
            return False
        return not data.startswith(self._own_table, pos)

    def touch(self) -> Touch:
        return Touch(self.structure, frozenset(self.sets), elsewhere=self.elsewhere)


def generation_port(data: bytes, start: int) -> int:
    """The netlink port of the socket that committed the generation a ``NEWGEN`` announces."""
    return int(_NLMSGHDR.unpack_from(data, start)[4])


def netlink_socket_inodes(listing: str, port: int) -> set[int]:
    """Pure: inodes of the nf_tables sockets bound to ``port`` in a /proc/net/netlink listing."""
    found = set()
    for line in listing.splitlines()[1:]:
        cols = line.split()
        if len(cols) <= _NETLINK_INODE or not cols[_NETLINK_PORT].isdigit():
            continue
        if int(cols[_NETLINK_PROTOCOL]) == NETLINK_NETFILTER and int(cols[_NETLINK_PORT]) == port:
            found.add(int(cols[_NETLINK_INODE]))
    return found


class OwnSockets:
    """Tells whether a netlink port of one network namespace is a socket of this process.

    The namespace is the creating thread's: its socket list (``/proc/thread-self/net/netlink``)
    is opened then and re-read later from any thread. A port is this process's when the socket
    bound to it is one of this process's open descriptors. Costs one read of that list and one
    ``readlink`` per open descriptor; callers remember the ports found to be their own.
    """

    def __init__(self) -> None:
        self._listing = os.open("/proc/thread-self/net/netlink", os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        os.close(self._listing)

    def __call__(self, port: int) -> bool:
        if port == 0:
            return False  # the kernel's own sockets, and sockets not bound yet
        inodes = netlink_socket_inodes(self._read_listing(), port)
        if not inodes:
            return False
        wanted = {f"socket:[{inode}]" for inode in inodes}
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):  # closed meanwhile
                if os.readlink(f"/proc/self/fd/{fd}") in wanted:
                    return True
        return False

    def _read_listing(self) -> str:
        chunks = []
        offset = 0
        while chunk := os.pread(self._listing, 1 << 16, offset):
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks).decode("ascii", "replace")


@dataclass
class NftMonitor:
    """Listens to nf_tables notifications in the calling thread's network namespace."""

    table: str
    # Whether a NEWGEN's committing port is a socket of this process; by default the sockets of
    # the creating thread's network namespace (``OwnSockets``).
    is_own: Callable[[int], bool] | None = None
    sock: socket.socket = field(init=False)
    _summary: GenerationSummary = field(init=False)
    # Netlink port ids of the sockets this process commits from (learnt from its own NEWGEN
    # headers): their notifications are dropped on arrival instead of kept until the NEWGEN.
    # Remembered for good: the agent's libnftables context keeps its socket for its lifetime.
    _own_ports: set[int] = field(init=False, default_factory=set)
    _buffer: bytearray = field(init=False, default_factory=lambda: bytearray(1 << 20))
    # The newest generation whose notifications were all read (a NEWGEN comes last), or the
    # generation when listening began; None if unknown.
    _generation: int | None = field(init=False, default=None)
    # What ``not_listening`` found for the waiter, and the pipe that wakes it to collect it.
    _pending: Touch = field(init=False, default_factory=Touch)
    _alarm: tuple[int, int] = field(init=False)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    _sockets: OwnSockets | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self._summary = GenerationSummary(self.table)
        if self.is_own is None:
            self._sockets = OwnSockets()
            self.is_own = self._sockets
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, 33, RECEIVE_BUFFER)  # SO_RCVBUFFORCE
            except OSError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            self.sock.bind((0, 0))
            self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
            self._generation = _generation_or_none()
            self._alarm = os.pipe()
        except BaseException:
            self.sock.close()
            if self._sockets is not None:
                self._sockets.close()
            raise

    def close(self) -> None:
        with self._lock:
            self.sock.close()
            for fd in self._alarm:
                os.close(fd)
            if self._sockets is not None:
                self._sockets.close()

    @contextlib.contextmanager
    def not_listening(self) -> Iterator[None]:
        """Leave the notification group around ONE transaction of the agent's own.

        Before leaving, everything already queued is read (netlink queues a multicast message
        at send time, so nothing sent before the drop is still on its way). After rejoining,
        the generation must be the last one fully read plus the block's own commit (one if it
        returned, none if it raised); anything else means a commit went unheard, possibly a
        foreign one only part of which was read, and the next ``wait`` reports ``lost``. Once
        the monitor is closed (the daemon is stopping) the block simply runs.
        """
        left = self._leave()
        committed = 0
        try:
            yield
            committed = 1
        finally:
            if left is not None:
                self._rejoin(*left, committed)

    def _leave(self) -> tuple[Touch, int | None] | None:
        """Drop the membership; (what was still queued, the last generation fully heard)."""
        with self._lock:
            if self.sock.fileno() < 0:
                return None
            touch = self._drain()
            self.sock.setsockopt(SOL_NETLINK, NETLINK_DROP_MEMBERSHIP, NFNLGRP_NFTABLES)
            return touch.merge(self._drain()), self._generation

    def _rejoin(self, touch: Touch, heard: int | None, committed: int) -> None:
        with self._lock:
            if self.sock.fileno() < 0:
                return
            self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
            # A generation cut off at the drop must not be folded into the next one.
            self._summary = GenerationSummary(self.table)
            now = _generation_or_none()
            if heard is None or now != heard + committed:
                touch = touch.merge(Touch(lost=True))
            self._generation = now
            if not touch.empty:
                self._pending = self._pending.merge(touch)
                os.write(self._alarm[1], b"!")

    def fileno(self) -> int:
        return self.sock.fileno()

    def wait(self, timeout: float | None, wake_fd: int | None = None) -> Touch:
        """Block up to ``timeout`` for notifications; return what foreign commits touched.

        Returns as soon as a foreign generation (or an overflow) was seen and nothing more is
        queued, when ``wake_fd`` becomes readable, or with an empty ``Touch`` at the timeout.
        """
        touch = self._take_pending()
        wait = 0.0 if not touch.empty else timeout
        own, alarm = self.sock.fileno(), self._alarm[0]
        fds = [own, alarm] if wake_fd is None else [own, alarm, wake_fd]
        while True:
            ready, _, _ = select.select(fds, [], [], wait)
            if alarm in ready:
                os.read(alarm, 4096)
                touch = touch.merge(self._take_pending())
            if own in ready:
                with self._lock:
                    touch = touch.merge(self._drain())
            elif alarm not in ready:
                return touch
            # Keep draining what is already queued (a burst of commits) before reporting.
            wait = 0.0 if not touch.empty else timeout

    def _take_pending(self) -> Touch:
        with self._lock:
            touch, self._pending = self._pending, Touch()
        return touch

    def _drain(self) -> Touch:
        touch = Touch()
        view = memoryview(self._buffer)
        while True:
            try:
                size = self.sock.recv_into(self._buffer, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return touch
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self._summary = GenerationSummary(self.table)
                    touch = touch.merge(Touch(lost=True))
                    continue
                raise
            if size >= _NLMSGHDR.size:
                length, kind, _flags, _seq, port = _NLMSGHDR.unpack_from(self._buffer, 0)
                if port in self._own_ports and length == size and kind & 0xFF != NFT_MSG_NEWGEN:
                    continue  # one message of the agent's own (a Sync sends 100,000 of them)
            data = bytes(view[:size])
            for kind, start, end in messages(data):
                if kind != NFT_MSG_NEWGEN:
                    self._summary.add(data, kind, start, end)
                    continue
                self._generation = generation_id(data, start, end)
                if not self._committed_by_us(generation_port(data, start)):
                    touch = touch.merge(self._summary.touch())
                self._summary = GenerationSummary(self.table)

    def _committed_by_us(self, port: int) -> bool:
        if port in self._own_ports:
            return True
        if self.is_own is not None and self.is_own(port):
            self._own_ports.add(port)
            return True
        return False


def _query(kind: int, flags: int, body: bytes) -> Iterator[tuple[int, bytes, int, int]]:
    """One nf_tables request on a fresh socket: (type, datagram, start, end) of each reply
    message, until the dump is done. ENOENT ends it quietly; another error raises OSError."""
    request = _NLMSGHDR.pack(
        _NLMSGHDR.size + len(body), (NFNL_SUBSYS_NFTABLES << 8) | kind, NLM_F_REQUEST | flags, 1, 0
    )
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
        sock.bind((0, 0))
        sock.send(request + body)
        while True:
            data = sock.recv(1 << 20)
            pos = 0
            while pos + _NLMSGHDR.size <= len(data):
                length, mtype, _f, _s, _p = _NLMSGHDR.unpack_from(data, pos)
                if length < _NLMSGHDR.size or mtype == NLMSG_DONE:
                    return
                if mtype == NLMSG_ERROR:
                    code = struct.unpack_from("=i", data, pos + _NLMSGHDR.size)[0]
                    if code == 0 or -code == errno.ENOENT:
                        return
                    raise OSError(-code, os.strerror(-code))
                yield mtype & 0xFF, data, pos, pos + length
                pos += (length + 3) & ~3


def count_rules(table: str, family: int = NFPROTO_INET) -> dict[str, int]:
    """Rules per chain of ``<family> <table>``, from one netlink dump (no set elements fetched).

    ``nft list chain`` would fetch every element of the table's sets first (~1 s at 100,000).
    An absent table dumps nothing.
    """
    name = table.encode() + b"\0"
    attr = _NLATTR.pack(_NLATTR.size + len(name), _ATTR_TABLE) + name
    attr += b"\0" * (-len(attr) % 4)
    counts: dict[str, int] = {}
    for kind, data, start, end in _query(
        NFT_MSG_GETRULE, NLM_F_DUMP, _NFGENMSG.pack(family, 0, 0) + attr
    ):
        if kind == NFT_MSG_NEWRULE:
            attrs = dict(_attrs(data, start + _HEADER_LEN, end))
            if _string(attrs.get(_ATTR_TABLE, b"")) == table:
                chain = _string(attrs.get(2, b""))
                counts[chain] = counts.get(chain, 0) + 1
    return counts


NFT_MSG_NEWTABLE = 0
NFT_MSG_GETTABLE = 1
_TABLE_FLAGS = 2
NFT_MSG_GETSETELEM = 13
NFT_SET_ELEM_INTERVAL_END = 0x1
_ELEM_LIST_ELEMENTS = 3
_LIST_ELEM = 1
_ELEM_KEY = 1
_ELEM_FLAGS = 3
_DATA_VALUE = 1


def _name_attr(kind: int, name: str) -> bytes:
    raw = name.encode() + b"\0"
    attr = _NLATTR.pack(_NLATTR.size + len(raw), kind) + raw
    return attr + b"\0" * (-len(attr) % 4)


def set_element_keys(
    table: str, set_name: str, family: int = NFPROTO_INET
) -> list[tuple[bytes, int]]:
    """(key, flags) of every element of ``<family> <table> <set_name>``, from one netlink dump.

    Meant for the small interval sets of static sources: libnftables would list more than the
    one set (nft 1.0.6 fetches sets it was not asked for). An absent set dumps nothing.
    """
    body = (
        _NFGENMSG.pack(family, 0, 0)
        + _name_attr(_ATTR_TABLE, table)
        + _name_attr(_ATTR_SET, set_name)
    )
    found: list[tuple[bytes, int]] = []
    for kind, data, start, end in _query(NFT_MSG_GETSETELEM, NLM_F_DUMP, body):
        if kind != NFT_MSG_NEWSETELEM:
            continue
        for attr, value in _attrs(data, start + _HEADER_LEN, end):
            if attr != _ELEM_LIST_ELEMENTS:
                continue
            for item, elem in _attrs(value, 0, len(value)):
                if item != _LIST_ELEM:
                    continue
                fields = dict(_attrs(elem, 0, len(elem)))
                key = dict(_attrs(fields.get(_ELEM_KEY, b""), 0, len(fields.get(_ELEM_KEY, b""))))
                flags = fields.get(_ELEM_FLAGS, b"\0\0\0\0")
                found.append((key.get(_DATA_VALUE, b""), int(struct.unpack("!I", flags[:4])[0])))
    return found


def table_flags(table: str, family: int = NFPROTO_INET) -> int | None:
    """The flags of ``<family> <table>`` (``NFT_TABLE_F_DORMANT`` = 1: its chains are off), or
    None when it is absent. Read here because nft 1.0.6 cannot list a dormant table as JSON:
    its answer stops in the middle of the table's flags."""
    body = _NFGENMSG.pack(family, 0, 0) + _name_attr(_ATTR_TABLE, table)
    for kind, data, start, end in _query(NFT_MSG_GETTABLE, 0, body):
        if kind == NFT_MSG_NEWTABLE:
            for attr, value in _attrs(data, start + _HEADER_LEN, end):
                if attr == _TABLE_FLAGS and len(value) >= 4:
                    return int(struct.unpack("!I", value[:4])[0])
            return 0
    return None


# The shipped unit sets this to systemd's %b (the boot id): its ProcSubset=pid hides /proc/sys.
BOOT_ID_ENV = "VICIFAST_BOOT_ID"
_BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"


def boot_id() -> str:
    """The kernel's id of this boot, as 32 lower-case hex digits.

    From ``$VICIFAST_BOOT_ID`` when set (the unit passes systemd's ``%b``, which systemd read
    from the same kernel file; the daemon's own ``/proc`` has no ``sys/`` under
    ``ProcSubset=pid``), else from ``/proc/sys/kernel/random/boot_id``. Both spellings (with or
    without dashes) give the same value, so a daemon started by hand and one started by the
    unit agree. Raises OSError when neither gives a boot id.
    """
    given = os.environ.get(BOOT_ID_ENV)
    raw = given if given is not None else Path(_BOOT_ID_FILE).read_text()
    value = raw.strip().replace("-", "").lower()
    if len(value) != 32 or value.strip("0123456789abcdef"):
        source = BOOT_ID_ENV if given is not None else _BOOT_ID_FILE
        raise OSError(errno.EINVAL, f"{source} holds no boot id")
    return value


def ruleset_fingerprint() -> int:
    """The calling thread's ruleset generation, qualified by boot and network namespace.

    Generations start again at each boot and in each namespace, so a bare number could match
    one recorded before a reboot (a table restored by nftables.conf, then as many commits).
    A 63-bit digest of boot id, namespace inode and generation: equal values mean the same
    ruleset history, at the same generation.
    """
    boot = boot_id()
    netns = os.stat("/proc/thread-self/ns/net").st_ino
    digest = hashlib.blake2b(f"{boot}:{netns}:{generation()}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def _generation_or_none() -> int | None:
    try:
        return generation()
    except OSError:
        return None


def generation() -> int:
    """The ruleset generation of the calling thread's network namespace.

    Every committed nf_tables transaction, of any table, moves it; element timeouts running
    out do not. Equal generations at two moments mean nobody changed the ruleset in between.
    """
    for kind, data, start, end in _query(NFT_MSG_GETGEN, 0, _NFGENMSG.pack(0, 0, 0)):
        if kind == NFT_MSG_NEWGEN:
            for attr, value in _attrs(data, start + _HEADER_LEN, end):
                if attr == _GEN_ID and len(value) >= 4:
                    return int(struct.unpack("!I", value[:4])[0])
    raise OSError(errno.EPROTO, "no generation in the kernel's answer")
