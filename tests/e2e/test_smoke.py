"""The daemon answers a signed Allow over mTLS and the softphone's packets then pass."""

from __future__ import annotations

from netlab import Lab

from agent.rpc.client import AgentClient, Entry
from agent.rpc.pb import agent_pb2


def test_allow_over_mtls_lets_the_softphone_reach_sip(lab: Lab, client: AgentClient) -> None:
    src = lab.addr.client(4)
    assert not lab.reaches("udp", 5060, family=4)
    result = client.allow([Entry(src, 600, "alice")])
    assert [r.status for r in result.results] == [agent_pb2.ADDED]
    assert lab.reaches("udp", 5060, family=4)
