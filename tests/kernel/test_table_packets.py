"""RULESET.md "What is gated" and "Entries", proved with real packets through the real kernel.

The agent's table is installed in a fresh server namespace and the client namespace sends to it;
each test states one sentence of the spec as what arrives and what does not.
"""

from __future__ import annotations

import pytest
from netlab import ADDR, Family, HostUdpFlow, Lab, Proto, wait_until
from tablekit import (
    PROTECTED,
    UNPROTECTED,
    Rig,
    host_tcp_connection_works,
    loopback_reaches,
    open_rig,
)

from agent.rules.conntrack import FILTERED_LOOKUPS_MAX, forget_flows

FAMILIES: list[Family] = [4, 6]
# A second address of the client's subnet: a different source under IPv4 (/32 entries).
NEIGHBOUR4 = ADDR.client4_alt
SIP: tuple[tuple[Proto, int], ...] = (("udp", 5060), ("tcp", 5060))


def verdicts(lab: Lab, ports: tuple[tuple[Proto, int], ...], src: str) -> dict[str, bool]:
    return {f"{port}/{proto}": lab.reaches(proto, port, src=src) for proto, port in ports}


def everywhere(ports: tuple[tuple[Proto, int], ...], value: bool) -> dict[str, bool]:
    return {f"{port}/{proto}": value for proto, port in ports}


# --- before any entry --------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_protected_ports_are_blocked_before_any_entry(rig: Rig, family: Family) -> None:
    src = rig.lab.addr.client(family)

    assert verdicts(rig.lab, PROTECTED, src) == everywhere(PROTECTED, False)


@pytest.mark.parametrize("family", FAMILIES)
def test_unprotected_ports_reach_without_any_entry(rig: Rig, family: Family) -> None:
    src = rig.lab.addr.client(family)

    assert verdicts(rig.lab, UNPROTECTED, src) == everywhere(UNPROTECTED, True)


def test_dropped_packets_are_counted(rig: Rig) -> None:
    before = rig.table.counters()["drop_agent"].packets

    assert not rig.lab.reaches("udp", 5060)
    assert not rig.lab.reaches("tcp", 5061, family=6)

    # One datagram, and at least one SYN (TCP may retransmit it within the probe's wait).
    assert rig.table.counters()["drop_agent"].packets >= before + 2


@pytest.mark.parametrize("proto", ["udp", "tcp"])
@pytest.mark.parametrize("family", FAMILIES)
def test_loopback_inside_the_server_is_not_touched(rig: Rig, proto: Proto, family: Family) -> None:
    assert loopback_reaches(rig.lab, proto, family, 5060)


# --- add and remove ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_entry_admits_its_source_to_every_protected_port(rig: Rig, family: Family) -> None:
    src = rig.lab.addr.client(family)

    rig.table.apply([rig.element(src)])

    assert verdicts(rig.lab, PROTECTED, src) == everywhere(PROTECTED, True)


@pytest.mark.parametrize("family", FAMILIES)
def test_entry_does_not_admit_another_source(rig: Rig, family: Family) -> None:
    rig.table.apply([rig.element(rig.lab.addr.client(family))])

    ports = SIP
    assert verdicts(rig.lab, ports, ADDR.far(family)) == everywhere(ports, False)


def test_ipv4_entry_is_one_address(rig: Rig) -> None:
    rig.table.apply([rig.element(ADDR.client4)])

    assert rig.lab.reaches("udp", 5060, src=ADDR.client4)
    assert not rig.lab.reaches("udp", 5060, src=NEIGHBOUR4)


@pytest.mark.parametrize("family", FAMILIES)
def test_removed_entry_blocks_its_source_again(rig: Rig, family: Family) -> None:
    src = rig.lab.addr.client(family)
    rig.table.apply([rig.element(src)])
    assert rig.lab.reaches("udp", 5060, src=src)

    applied = rig.table.apply(removals=[rig.key(src)])

    assert applied.plan.removes == (rig.key(src),)
    ports = SIP
    assert verdicts(rig.lab, ports, src) == everywhere(ports, False)


@pytest.mark.parametrize("family", FAMILIES)
def test_revoke_cuts_established_udp_flow(rig: Rig, family: Family) -> None:
    src = rig.lab.addr.client(family)
    rig.table.apply([rig.element(src)])
    with rig.lab.udp_flow(family=family) as flow:
        assert flow.exchange()
        assert flow.exchange()
        assert len(rig.lab.srv.conntrack(*flow.conntrack_args())) == 1

        rig.table.apply(removals=[rig.key(src)])
        with rig.lab.srv.entered():  # as the engine does after a revoke
            cut = forget_flows([rig.key(src).address])

        assert cut.deleted >= 1
        assert not flow.exchange()


def test_one_revoke_of_both_families_cuts_the_flows_of_each(rig: Rig) -> None:
    sources = [rig.lab.addr.client(4), rig.lab.addr.client(6)]
    rig.table.apply([rig.element(src) for src in sources])
    with rig.lab.udp_flow(family=4) as flow4, rig.lab.udp_flow(family=6) as flow6:
        assert flow4.exchange()
        assert flow6.exchange()

        rig.table.apply(removals=[rig.key(src) for src in sources])
        with rig.lab.srv.entered():
            cut = forget_flows([rig.key(src).address for src in sources])

        assert (cut.deleted >= 2, cut.failed) == (True, 0)
        assert rig.lab.srv.conntrack(*flow4.conntrack_args()) == []
        assert rig.lab.srv.conntrack(*flow6.conntrack_args()) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_forgetting_flows_keeps_the_flows_of_other_sources(rig: Rig, family: Family) -> None:
    """A single IPv4 address is looked up by the kernel's dump filter, an IPv6 /64 entry by
    matching every flow here: either way, only the revoked source loses its flows. The /64 holds
    the server's own address, the reply source of every flow coming in: that is not a match."""
    src, other = rig.lab.addr.client(family), ADDR.far(family)
    rig.table.apply([rig.element(src), rig.element(other)])
    with rig.lab.udp_flow(src=src) as mine, rig.lab.udp_flow(src=other, port=4569) as theirs:
        assert mine.exchange()
        assert theirs.exchange()

        with rig.lab.srv.entered():
            cut = forget_flows([rig.key(src).address])

        # At least its SIP flow: the lab's readiness probes may have left one of the source's.
        assert (cut.deleted >= 1, cut.failed) == (True, 0)
        assert rig.lab.srv.conntrack(*mine.conntrack_args()) == []
        assert len(rig.lab.srv.conntrack(*theirs.conntrack_args())) == 1
        assert theirs.exchange()


def test_forgetting_the_servers_own_address_cuts_no_flow(rig: Rig) -> None:
    """The server's address is the reply source of every flow coming in: revoking an entry for
    it must not take them all."""
    rig.table.apply([rig.element(rig.lab.addr.client(4))])
    with rig.lab.udp_flow(family=4) as flow:
        assert flow.exchange()

        with rig.lab.srv.entered():
            cut = forget_flows([rig.key(rig.lab.addr.server(4)).address])

        assert (cut.deleted, cut.failed) == (0, 0)
        assert len(rig.lab.srv.conntrack(*flow.conntrack_args())) == 1


def test_forgetting_the_flows_of_many_addresses_matches_every_flow_once(rig: Rig) -> None:
    """Past the few addresses the kernel looks up one by one, a single dump is matched here:
    the flows of the listed sources go (including one the host initiated), the others stay."""
    listed = [rig.lab.addr.client(4), ADDR.client4_alt]  # the second only answers the host
    unrelated = [f"198.18.{i}.9" for i in range(1, FILTERED_LOOKUPS_MAX + 1)]
    rig.table.apply([rig.element(listed[0])])
    with (
        rig.lab.udp_flow(src=listed[0]) as first,
        HostUdpFlow(rig.lab, 4, listed[1], port=4569) as second,
        rig.lab.udp_flow(src=ADDR.client4_far, port=5062, sport=41001) as stranger,  # open port
    ):
        assert first.exchange()
        assert second.server_sends()
        assert second.client_answers()
        assert stranger.exchange()

        with rig.lab.srv.entered():
            cut = forget_flows([rig.key(a).address for a in [*listed, *unrelated, listed[0]]])

        assert (cut.deleted >= 2, cut.failed) == (True, 0)
        assert rig.lab.srv.conntrack(*first.conntrack_args()) == []
        assert not second.client_answers()
        assert stranger.exchange()


@pytest.mark.parametrize("family", FAMILIES)
def test_revoked_source_is_dropped_on_its_live_flow_without_conntrack_help(
    rig: Rig, family: Family
) -> None:
    """No ``ct state established`` shortcut: the sets judge every original-direction packet."""
    src = rig.lab.addr.client(family)
    rig.table.apply([rig.element(src)])
    with rig.lab.udp_flow(family=family) as flow:
        assert flow.exchange()
        rig.table.apply(removals=[rig.key(src)])
        dropped = rig.table.counters()["drop_agent"].packets

        assert not flow.exchange()

        # The conntrack entry still stands, and it was the client's request the chain dropped.
        assert len(rig.lab.srv.conntrack(*flow.conntrack_args())) == 1
        assert rig.table.counters()["drop_agent"].packets == dropped + 1


# --- replies to connections the host initiated -------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_replies_to_a_udp_flow_the_host_initiated_pass(rig: Rig, family: Family) -> None:
    src = rig.lab.addr.client(family)
    with HostUdpFlow(rig.lab, family, src) as flow:
        assert flow.server_sends()

        assert flow.client_answers()
        assert flow.client_answers()
    assert not rig.lab.reaches("udp", 5060, src=src)  # the same source, unsolicited


@pytest.mark.parametrize("family", FAMILIES)
def test_replies_to_a_tcp_connection_the_host_initiated_pass(rig: Rig, family: Family) -> None:
    assert host_tcp_connection_works(rig.lab, family, rig.lab.addr.client(family))


@pytest.mark.parametrize("family", FAMILIES)
def test_forgetting_flows_cuts_a_revoked_source_off_a_host_initiated_flow(
    rig: Rig, family: Family
) -> None:
    """Why the engine calls forget_flows: replies bypass the sets until the entry is gone."""
    src = rig.lab.addr.client(family)
    with HostUdpFlow(rig.lab, family, src) as flow:
        assert flow.server_sends()
        assert flow.client_answers()

        with rig.lab.srv.entered():
            cut = forget_flows([rig.key(src).address])

        assert cut.deleted >= 1
        assert not flow.client_answers()


# --- expiry ------------------------------------------------------------------------------------


def test_entry_stops_admitting_when_its_timeout_passes(rig: Rig) -> None:
    rig.table.apply([rig.element(ADDR.client4, timeout_s=2)])
    assert rig.lab.reaches("udp", 5060)

    wait_until(lambda: not rig.lab.reaches("udp", 5060), timeout=6, what="the entry to expire")

    assert rig.key(ADDR.client4) not in rig.table.read_elements()
    assert not rig.lab.reaches("tcp", 5060)


# --- IPv6 prefix policy ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ipv6_prefix", "expected"),
    [
        (64, {ADDR.client6: True, ADDR.client6_alt: True, ADDR.client6_far: False}),
        (128, {ADDR.client6: True, ADDR.client6_alt: False, ADDR.client6_far: False}),
    ],
)
def test_ipv6_entry_admits_its_prefix_under_the_policy(
    lab: Lab, ipv6_prefix: int, expected: dict[str, bool]
) -> None:
    rig = open_rig(lab, f"ipv6_prefix = {ipv6_prefix}")

    rig.table.apply([rig.element(ADDR.client6)])

    assert {src: lab.reaches("udp", 5060, src=src) for src in expected} == expected


# --- the agent's own ports and static sources --------------------------------------------------

API_PORT = 7443
METRICS_PORT = 9617


@pytest.mark.parametrize(
    ("sections", "port", "expected"),
    [
        pytest.param(
            '[api]\ncontrol_plane_sources = ["198.18.0.2/32"]',
            API_PORT,
            {ADDR.client4: True, ADDR.client4_alt: False, ADDR.client6: False},
            id="api-gated",
        ),
        pytest.param(
            '[metrics]\nscrape_sources = ["198.18.0.3/32", "2001:db8:0:2::/64"]',
            METRICS_PORT,
            {ADDR.client4: False, ADDR.client4_alt: True, ADDR.client6_far: True},
            id="metrics-gated",
        ),
        pytest.param(
            "",
            API_PORT,
            {ADDR.client4: True, ADDR.client4_alt: True, ADDR.client6_far: True},
            id="api-open-without-sources",
        ),
    ],
)
def test_guarded_port_is_reachable_only_from_its_sources(
    lab: Lab, sections: str, port: int, expected: dict[str, bool]
) -> None:
    open_rig(lab, sections=sections)

    assert {src: lab.reaches("tcp", port, src=src) for src in expected} == expected


def test_static_sources_are_admitted_without_an_entry(lab: Lab) -> None:
    open_rig(lab, sections='[static_sources]\nall = ["198.19.0.0/24", "2001:db8:0:2::/64"]')

    got = {
        (src, proto): lab.reaches(proto, 5060, src=src)
        for src in (ADDR.client4_far, ADDR.client6_far, ADDR.client4)
        for proto in ("udp", "tcp")
    }

    assert got == {
        (ADDR.client4_far, "udp"): True,
        (ADDR.client4_far, "tcp"): True,
        (ADDR.client6_far, "udp"): True,
        (ADDR.client6_far, "tcp"): True,
        (ADDR.client4, "udp"): False,
        (ADDR.client4, "tcp"): False,
    }


def test_deleting_the_table_opens_the_protected_ports_again(rig: Rig) -> None:
    assert not rig.lab.reaches("udp", 5060)

    rig.table.delete()

    assert rig.lab.reaches("udp", 5060)
    assert rig.lab.reaches("tcp", 5061, family=6)
