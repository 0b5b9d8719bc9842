"""What the kernel does with real packets after real signed requests (the client's namespace
sends to SIP on the daemon's namespace): granted sources pass, revoked and replaced ones are
dropped, a refused request opens nothing.
"""

from __future__ import annotations

import pytest
from e2ekit import C, RawCaller, allow_entry, now_ms, scrape, value
from netlab import Family, HostUdpFlow, Lab, wait_until

from agent.devlab import TcpRelay
from agent.rpc.client import AgentCallError, AgentClient, Entry
from agent.rpc.pb import agent_pb2


def test_granted_source_passes_and_revoked_source_is_dropped(lab: Lab, client: AgentClient) -> None:
    a = lab.addr
    assert not lab.reaches("udp", 5060, src=a.client4)
    client.allow([Entry(a.client4, 600, "alice")])
    assert lab.reaches("udp", 5060, src=a.client4)
    assert lab.reaches("tcp", 5061, src=a.client4)
    assert not lab.reaches("udp", 5060, src=a.client4_alt)  # only what was granted
    result = client.revoke([a.client4])
    assert [r.status for r in result.results] == [agent_pb2.REMOVED]
    assert not lab.reaches("udp", 5060, src=a.client4)


@pytest.mark.parametrize("family", [4, 6])
def test_a_revoke_cuts_the_flow_the_server_opened_to_the_source(
    lab: Lab, client: AgentClient, metrics: TcpRelay, family: Family
) -> None:
    """Asterisk qualifying a phone opens a flow whose answers pass as replies, past the sets;
    the daemon deletes such flows of a revoked source (the IPv6 one by its /64, which holds the
    server's own address: the flows of other sources stay) and counts them."""
    source, stranger = lab.addr.client(family), lab.addr.far(family)
    client.allow([Entry(source, 600, "alice"), Entry(stranger, 600, "bob")])
    with (
        HostUdpFlow(lab, family, source) as qualify,
        lab.udp_flow(src=stranger, port=4569) as other,
    ):
        assert qualify.server_sends()
        assert qualify.client_answers()
        assert other.exchange()

        client.revoke([source])
        # The flows are cut after the answer, on the flow cutter's thread: wait for the count.
        wait_until(
            lambda: value(scrape(metrics), "vicifast_agent_flows_cut_total") == 1,
            timeout=10,
            what="the revoked source's flow cut",
        )

        assert not qualify.client_answers()
        assert len(lab.srv.conntrack(*other.conntrack_args())) == 1
        samples = scrape(metrics)
        assert value(samples, "vicifast_agent_flows_cut_total") == 1
        assert value(samples, "vicifast_agent_flow_cut_failures_total") == 0


def test_an_ipv6_grant_admits_its_slash_64(lab: Lab, client: AgentClient) -> None:
    a = lab.addr
    result = client.allow([Entry(a.client6, 600, "bob")])
    assert [r.address for r in result.results] == ["2001:db8:0:1::/64"]
    assert lab.reaches("udp", 5060, src=a.client6)
    assert lab.reaches("udp", 5060, src=a.client6_alt)
    assert not lab.reaches("udp", 5060, src=a.client6_far)


def test_sync_replaces_the_granted_sources(lab: Lab, client: AgentClient) -> None:
    a = lab.addr
    client.allow([Entry(a.client4, 600, "alice"), Entry(a.client6, 600, "alice")])
    assert lab.reaches("udp", 5060, src=a.client4)
    result = client.sync([Entry(a.client4_alt, 600, "carol")])
    assert sorted((r.address, r.status) for r in result.results) == [
        ("198.18.0.2", agent_pb2.REMOVED),
        ("198.18.0.3", agent_pb2.ADDED),
        ("2001:db8:0:1::/64", agent_pb2.REMOVED),
    ]
    assert lab.reaches("udp", 5060, src=a.client4_alt)
    assert not lab.reaches("udp", 5060, src=a.client4)
    assert not lab.reaches("udp", 5060, src=a.client6)


@pytest.mark.parametrize("bad", ["10.0.0.1", "198.18.0.3/24", "198.18.0.3 "])
def test_a_refused_request_opens_nothing(
    lab: Lab, client: AgentClient, raw: RawCaller, bad: str
) -> None:
    with pytest.raises(AgentCallError) as refused:
        client.allow([Entry(lab.addr.client4, 600, "alice"), Entry(bad, 600, "alice")])
    assert refused.value.code == C.INVALID_ARGUMENT
    assert refused.value.reason in {"address_not_global", "host_bits_set", "invalid_address"}
    assert raw.state().entries == []
    assert not lab.reaches("udp", 5060, src=lab.addr.client4)


def test_erase_drops_the_persons_sources(lab: Lab, client: AgentClient, raw: RawCaller) -> None:
    a = lab.addr
    client.allow([Entry(a.client4, 600, "dave"), Entry(a.client4_alt, 600, "erin")])
    result = client.erase("dave")
    assert [(r.address, r.status) for r in result.results] == [("198.18.0.2", agent_pb2.REMOVED)]
    assert not lab.reaches("udp", 5060, src=a.client4)
    assert lab.reaches("udp", 5060, src=a.client4_alt)
    assert [e.subject for e in raw.state().entries] == ["erin"]


def test_a_stale_allow_does_not_reopen_a_revoked_source(lab: Lab, raw: RawCaller) -> None:
    t = now_ms()
    assert raw.allow(allow_entry(lab.addr.client4), issued_ms=t - 20_000).ok
    assert raw.revoke([lab.addr.client4], issued_ms=t).ok
    stale = raw.allow(allow_entry(lab.addr.client4), issued_ms=t - 10_000)
    assert stale.result is not None
    assert [r.status for r in stale.result.results] == [agent_pb2.STALE]
    assert not lab.reaches("udp", 5060, src=lab.addr.client4)
