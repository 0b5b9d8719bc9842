"""Kernel-test plumbing for the rules layer: the agent's table in a lab's server namespace.

Owns only what runs inside a ``Lab``'s namespaces: the ``FirewallTable`` under test, listings of
tables by ``nft -j``, and the few socket exchanges ``netlab`` has no probe for (loopback inside
the server, connections the server itself initiates). It never changes the table by itself; a
test does that through ``FirewallTable`` so that what is proved is the rules layer.
"""

from __future__ import annotations

import copy
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from netlab import HOST_PORT, PROBE_TIMEOUT, Family, Lab, Proto

from agent.config import AgentConfig, parse_config
from agent.model import Element, EntryKey
from agent.policy import normalize_address
from agent.rules.nft import NftAdapter
from agent.rules.render import element_comment
from agent.rules.table import FirewallTable

TABLE = "vicifast"
OTHER = "other"
# Another owner's table with a base chain on the agent's hook, a rule and a set with elements:
# what firewalld or a sysadmin leaves next to ours. Its elements carry no timeout, so its listing
# is stable byte for byte as long as no packet crosses its counters.
OTHER_TABLE = """
table inet other {
    set blocked {
        type ipv4_addr
        elements = { 198.51.100.7, 203.0.113.9 }
    }
    chain input {
        type filter hook input priority 0; policy accept;
        ip saddr @blocked counter drop
        tcp dport 2222 counter accept comment "ssh on the side"
    }
}
"""
# Protected ports of the default ``agent`` profile (RULESET.md "Profiles").
PROTECTED: tuple[tuple[Proto, int], ...] = (
    ("udp", 5060),
    ("tcp", 5060),
    ("tcp", 5061),
    ("tcp", 443),
    ("tcp", 8088),
    ("tcp", 8089),
    ("udp", 4569),
)
# Left open on purpose: RTP (carrier media) and HTTP 80 (ACME renewals), and a neighbour of SIP.
UNPROTECTED: tuple[tuple[Proto, int], ...] = (("udp", 5062), ("tcp", 80), ("udp", 10000))


def config(firewall: str = "", sections: str = "") -> AgentConfig:
    """A config with test ranges permitted; ``firewall`` adds ``[firewall]`` keys."""
    text = f'agent_id = "t"\n[firewall]\npermit_test_ranges = true\n{firewall}\n{sections}\n'
    return parse_config(text)


@dataclass(slots=True)
class Rig:
    """One lab, one config and the agent's table installed and probed in the server namespace."""

    lab: Lab
    cfg: AgentConfig
    table: FirewallTable

    def key(self, address: str, profile: str = "agent") -> EntryKey:
        return EntryKey(profile, normalize_address(address, self.cfg.address_policy))

    def element(
        self,
        address: str,
        timeout_s: int = 3600,
        *,
        subject: str = "agent-1",
        request_id: str = "req-1",
        profile: str = "agent",
    ) -> Element:
        return Element(self.key(address, profile), timeout_s, element_comment(subject, request_id))

    def listing(self, *what: str) -> dict[str, Any]:
        """``nft -j list <what>`` in the server namespace, parsed."""
        return self.lab.srv.nft_json("list", *what)

    def other_table(self) -> str:
        """Another owner's table exactly as nft prints it (compared byte for byte)."""
        return self.lab.srv.nft("-j", "list", "table", "inet", OTHER)

    def tables(self) -> list[str]:
        listing = self.listing("tables")
        return sorted(
            f"{i['table']['family']} {i['table']['name']}"
            for i in listing["nftables"]
            if "table" in i
        )


def open_rig(lab: Lab, firewall: str = "", sections: str = "") -> Rig:
    cfg = config(firewall, sections)
    # The libnftables context must be created inside the namespace it is to talk to.
    table = FirewallTable(cfg.firewall, lab.srv.call(NftAdapter))
    table.install()
    table.probe()
    return Rig(lab, cfg, table)


def split_expires(listing: dict[str, Any]) -> tuple[dict[str, Any], dict[tuple[str, str], int]]:
    """A listing without the ``expires`` countdowns, and those countdowns by (set, value).

    ``expires`` is the one field that changes while nothing happens; everything else of a
    listing must stay identical across a refused batch.
    """
    stable = copy.deepcopy(listing)
    expires: dict[tuple[str, str], int] = {}
    for item in stable["nftables"]:
        s = item.get("set")
        for raw in (s or {}).get("elem", ()):
            elem = raw.get("elem") if isinstance(raw, dict) else None
            if isinstance(elem, dict) and "expires" in elem:
                expires[(s["name"], str(elem["val"]))] = elem.pop("expires")
    return stable, expires


def assert_unchanged(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Equal listings, except that countdowns may only have run down (no element re-created)."""
    stable_before, exp_before = split_expires(before)
    stable_after, exp_after = split_expires(after)
    assert stable_after == stable_before
    assert exp_after.keys() == exp_before.keys()
    assert all(exp_after[k] <= exp_before[k] for k in exp_before)


# --- exchanges netlab has no probe for ---------------------------------------------------------


def _receive(sock: socket.socket, token: bytes, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data = sock.recv(2048)
        except TimeoutError:
            return False
        if data == token:
            return True
    return False


def loopback_reaches(lab: Lab, proto: Proto, family: Family, port: int) -> bool:
    """Whether the server reaches its own loopback ``port`` (127.0.0.1 or ::1)."""
    host = "127.0.0.1" if family == 4 else "::1"
    kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
    token = os.urandom(8)
    with lab.srv.socket(family, kind) as listener, lab.srv.socket(family, kind) as sender:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        if proto == "udp":
            sender.sendto(token, (host, port))
            return _receive(listener, token, PROBE_TIMEOUT)
        listener.listen(1)
        sender.settimeout(PROBE_TIMEOUT)
        try:
            sender.connect((host, port))
        except OSError:
            return False
        sender.sendall(token)
        listener.settimeout(PROBE_TIMEOUT)
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            return False
        with conn:
            return _receive(conn, token, PROBE_TIMEOUT)


def host_tcp_connection_works(lab: Lab, family: Family, src: str, port: int = 5060) -> bool:
    """The server connects from ``server:port`` to a client listener; the client's data arrives.

    The client's SYN-ACK and data are addressed to the protected ``port``, in the reply direction.
    """
    token = os.urandom(8)
    with (
        lab.cli.socket(family, socket.SOCK_STREAM) as listener,
        lab.srv.socket(family, socket.SOCK_STREAM) as conn,
    ):
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((src, HOST_PORT))
        listener.listen(1)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        conn.bind((lab.addr.server(family), port))
        conn.settimeout(PROBE_TIMEOUT)
        try:
            conn.connect((src, HOST_PORT))
        except OSError:
            return False
        listener.settimeout(PROBE_TIMEOUT)
        accepted, _ = listener.accept()
        with accepted:
            accepted.sendall(token)
        return _receive(conn, token, PROBE_TIMEOUT)


__all__ = [
    "OTHER",
    "OTHER_TABLE",
    "PROTECTED",
    "TABLE",
    "UNPROTECTED",
    "Rig",
    "assert_unchanged",
    "config",
    "host_tcp_connection_works",
    "loopback_reaches",
    "open_rig",
    "split_expires",
]
