"""``why`` next to fail2ban, an interval block list and a firewalld-like zone: other tables' named
sets are read from the real kernel and looked up (elements, prefixes, ranges, timeouts), so an
address in a ban set is dropped, one outside it accepted, and an expired ban no longer counts.
"""

from __future__ import annotations

import pytest
from netlab import wait_until
from tablekit import Rig

from agent.local.kernel_view import read_other_input_chains
from agent.rules.shadowing import read_shadowing
from agent.why import ChainOutcome, other_chains_verdicts, parse_packet

# fail2ban's nftables action: its own table, one set per jail (IPv4 and IPv6), banned addresses
# with the ban time as the element's timeout, a base chain that rejects them on the jail's ports.
FAIL2BAN = """
table inet f2b-table {
    set addr-set-sip {
        type ipv4_addr; flags timeout;
        elements = { 198.18.9.1 timeout 1h, 198.18.9.3 }
    }
    set addr6-set-sip {
        type ipv6_addr; flags timeout;
        elements = { 2001:db8:9::1 timeout 1h }
    }
    chain f2b-chain {
        type filter hook input priority -1; policy accept;
        udp dport { 5060, 5061 } ip saddr @addr-set-sip reject
        udp dport { 5060, 5061 } ip6 saddr @addr6-set-sip reject
    }
}
"""
# A block list of networks and ranges (an interval set), as admins load from a feed.
BLOCKLIST = """
table ip blocklist {
    set nets {
        type ipv4_addr; flags interval;
        elements = { 198.18.10.0/24, 198.18.11.1-198.18.11.9 }
    }
    chain input {
        type filter hook input priority 5; policy accept;
        ip saddr @nets drop
    }
}
"""
# firewalld's shape: ct state and lo first, zones by jump and goto, an allow-list ipset and a
# port set in the zone, then a final reject.
FIREWALLD = """
table inet zones {
    set trusted { type ipv4_addr; flags interval; elements = { 198.18.20.0/24 } }
    set sip-ports { type inet_service; elements = { 5060, 5061 } }
    chain filter_INPUT {
        type filter hook input priority 10; policy accept;
        ct state { established, related } accept
        iifname "lo" accept
        jump filter_INPUT_ZONES
        reject with icmpx admin-prohibited
    }
    chain filter_INPUT_ZONES { goto filter_IN_public; }
    chain filter_IN_public { jump filter_IN_public_allow; }
    chain filter_IN_public_allow {
        ip saddr @trusted udp dport @sip-ports accept
        tcp dport 22 accept
    }
}
"""
CHAINS = {
    "f2b": "inet f2b-table f2b-chain",
    "blocklist": "ip blocklist input",
    "zones": "inet zones filter_INPUT",
}
A, D = ChainOutcome.ACCEPTS, ChainOutcome.DROPS


@pytest.fixture
def neighbours(rig: Rig) -> Rig:
    rig.lab.srv.nft_script(FAIL2BAN + BLOCKLIST + FIREWALLD)
    return rig


def outcomes(rig: Rig, address: str, port: str = "5060/udp") -> dict[str, ChainOutcome]:
    view = read_other_input_chains(rig.table.nft, rig.cfg.firewall.table)
    found = {
        str(f.chain.ref): f.outcome
        for f in other_chains_verdicts(view, parse_packet(address, port))
    }
    return {name: found[ref] for name, ref in CHAINS.items() if ref in found}


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("198.18.9.1", {"f2b": D, "blocklist": A, "zones": D}),  # banned (for an hour)
        ("198.18.9.3", {"f2b": D, "blocklist": A, "zones": D}),  # banned without a timeout
        ("198.18.9.2", {"f2b": A, "blocklist": A, "zones": D}),  # not banned
        ("198.18.10.77", {"f2b": A, "blocklist": D, "zones": D}),  # in a blocked prefix
        ("198.18.11.5", {"f2b": A, "blocklist": D, "zones": D}),  # in a blocked range
        ("198.18.11.10", {"f2b": A, "blocklist": A, "zones": D}),  # just past the range
        ("198.18.20.5", {"f2b": A, "blocklist": A, "zones": A}),  # trusted by the zone
        # the zone trusts IPv4 sources only and rejects the rest, IPv6 included
        ("2001:db8:9::1", {"f2b": D, "zones": D}),  # banned IPv6
        ("2001:db8:9::2", {"f2b": A, "zones": D}),
    ],
)
def test_other_tables_sets_decide_the_answer(
    neighbours: Rig, address: str, expected: dict[str, ChainOutcome]
) -> None:
    assert outcomes(neighbours, address) == expected


def test_ports_are_looked_up_too(neighbours: Rig) -> None:
    # outside the jail's ports: not banned; outside the zone's port set: not trusted
    assert outcomes(neighbours, "198.18.9.1", "5062/udp")["f2b"] is A
    assert outcomes(neighbours, "198.18.20.5", "5062/udp")["zones"] is D


def test_an_expired_ban_no_longer_drops(neighbours: Rig) -> None:
    srv = neighbours.lab.srv
    srv.nft("add", "element", "inet", "f2b-table", "addr-set-sip", "{ 198.18.9.9 timeout 1s }")
    assert outcomes(neighbours, "198.18.9.9")["f2b"] is D

    wait_until(
        lambda: "198.18.9.9" not in srv.nft("list", "set", "inet", "f2b-table", "addr-set-sip"),
        timeout=10,
        what="the ban to time out",
    )

    assert outcomes(neighbours, "198.18.9.9")["f2b"] is A


def test_a_set_that_cannot_be_read_is_a_doubt_not_a_guess(neighbours: Rig) -> None:
    # A rule looking up a set the reader is never given (the set limit, or it vanished) says
    # "may drop" for the addresses it could hold.
    view = read_other_input_chains(neighbours.table.nft, neighbours.cfg.firewall.table)
    blind = type(view)(view.base_chains, view.rules, {}, view.read_at_s)
    found = {
        str(f.chain.ref): f.outcome
        for f in other_chains_verdicts(blind, parse_packet("198.18.9.2", "5060/udp"))
    }
    assert found[CHAINS["f2b"]] is ChainOutcome.MAY_DROP


def test_shadowing_asks_the_same_evaluator_and_names_only_the_zone(neighbours: Rig) -> None:
    # fail2ban and the block list drop chosen sources only; the zone rejects every source it
    # does not trust, so it shadows the agent's allow entries (on both SIP ports).
    fw = neighbours.cfg.firewall
    found = read_shadowing(
        neighbours.table.nft,
        own_table=fw.table,
        own_priority=fw.chain_priority,
        protected=[port for p in fw.profiles for port in p.ports],
    )

    assert [(s.table, s.why) for s in found] == [("zones", "rule drops")]
