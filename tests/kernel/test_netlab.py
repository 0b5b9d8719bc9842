"""Self-tests of the kernel-test harness: it sees packets arrive, and it sees them not arrive.

A harness whose probes always said "arrived" (or never) would make every behavioural kernel test
meaningless, so each probe kind is shown here to flip with a plain nft rule of our own.
"""

from __future__ import annotations

import errno
import os
import socket

import pytest
from netlab import ADDR, Addresses, Family, Lab, Proto, current_netns_inode, wait_until

PROBE_TABLE = """
table inet probe {
    chain input {
        type filter hook input priority 0; policy accept;
        ct state established counter
    }
}
"""

PROBES: list[tuple[Proto, Family]] = [("udp", 4), ("udp", 6), ("tcp", 4), ("tcp", 6)]
OTHER_SOURCES = [
    ADDR.client4_alt,
    ADDR.client4_far,
    ADDR.client6_alt,
    ADDR.client6_far,
]


@pytest.mark.parametrize(("proto", "family"), PROBES)
def test_probe_arrives_without_a_ruleset(lab: Lab, proto: Proto, family: Family) -> None:
    probe = lab.probe(proto, 5060, family=family)

    assert probe.arrived
    assert probe.source == lab.addr.client(family)


@pytest.mark.parametrize("proto", ["udp", "tcp"])
@pytest.mark.parametrize("src", OTHER_SOURCES)
def test_probe_from_another_source_arrives_from_that_source(
    lab: Lab, proto: Proto, src: str
) -> None:
    assert lab.probe(proto, 5060, src=src).source == src


@pytest.mark.parametrize("family", [4, 6])
def test_udp_drop_rule_stops_udp_probe_but_not_tcp(lab: Lab, family: Family) -> None:
    lab.srv.nft_script(PROBE_TABLE)
    lab.srv.nft("add", "rule", "inet", "probe", "input", "udp", "dport", "5060", "drop")

    assert not lab.reaches("udp", 5060, family=family)
    assert lab.reaches("tcp", 5060, family=family)
    assert lab.reaches("udp", 5061, family=family)


def test_tcp_drop_rule_stops_tcp_probe(lab: Lab) -> None:
    lab.srv.nft_script(PROBE_TABLE)
    lab.srv.nft("add", "rule", "inet", "probe", "input", "tcp", "dport", "5061", "drop")

    assert not lab.reaches("tcp", 5061, family=6)
    assert lab.reaches("tcp", 5060, family=6)


@pytest.mark.parametrize("family", [4, 6])
def test_established_udp_flow_stops_after_a_drop_rule(lab: Lab, family: Family) -> None:
    lab.srv.nft_script(PROBE_TABLE)  # its ct rule turns conntrack on in the server namespace
    with lab.udp_flow(family=family) as flow:
        assert flow.exchange()
        assert flow.exchange()
        assert len(lab.srv.conntrack(*flow.conntrack_args())) == 1

        lab.srv.nft("add", "rule", "inet", "probe", "input", "udp", "dport", "5060", "drop")

        assert not flow.exchange()
        assert len(lab.srv.conntrack(*flow.conntrack_args())) == 1


def test_nft_runner_reads_back_another_owners_table_as_json(lab: Lab) -> None:
    lab.srv.nft_script(PROBE_TABLE)

    listing = lab.srv.nft_json("list", "table", "inet", "probe")

    tables = [item["table"] for item in listing["nftables"] if "table" in item]
    assert [(t["family"], t["name"]) for t in tables] == [("inet", "probe")]
    assert "table inet probe" in lab.srv.ruleset()
    assert lab.cli.ruleset() == ""


def _bind_errno(address: str) -> int:
    with socket.socket() as sock:
        try:
            sock.bind((address, 0))
        except OSError as e:
            return e.errno or -1
    return 0


def test_entered_moves_this_thread_into_the_namespace_and_back(lab: Lab) -> None:
    home = current_netns_inode()

    with lab.srv.entered():
        assert current_netns_inode() == lab.srv.inode
        assert _bind_errno(lab.addr.server4) == 0  # only the server namespace has this address

    assert current_netns_inode() == home
    assert _bind_errno(lab.addr.server4) == errno.EADDRNOTAVAIL


def test_entered_returns_home_when_the_block_raises(lab: Lab) -> None:
    home = current_netns_inode()

    with pytest.raises(LookupError), lab.cli.entered():
        raise LookupError

    assert current_netns_inode() == home


def test_socket_and_nftables_context_stay_in_the_namespace_they_were_made_in(lab: Lab) -> None:
    nft = lab.srv.nftables()
    sock = lab.srv.socket(4)

    with lab.cli.entered():
        rc, _, err = nft.cmd("add table inet made_in_srv")
        sock.bind((lab.addr.server4, 0))
    sock.close()

    assert (rc, err) == (0, "")
    assert "made_in_srv" in lab.srv.nft("list", "tables")
    assert lab.cli.nft("list", "tables") == ""


def test_close_removes_both_namespaces() -> None:
    lab = Lab()
    paths = [lab.srv.path, lab.cli.path]
    assert all(os.path.exists(p) for p in paths)

    lab.close()

    assert not any(os.path.exists(p) for p in paths)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("server4", "10.0.0.1"),
        ("client4_far", "198.20.0.1"),
        ("far_net4", "198.0.0.0/8"),
        ("client6_far", "2001:db9::1"),
        ("net6", "2001:db8::/31"),
    ],
)
def test_address_plan_refuses_addresses_outside_the_test_ranges(field: str, value: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - ValueError is the whole contract here
        Addresses(**{field: value})


def test_wait_until_raises_at_the_deadline() -> None:
    with pytest.raises(TimeoutError):
        wait_until(lambda: False, timeout=0.05, what="never")
