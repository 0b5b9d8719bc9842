"""Undecodable GetState and WatchEvents requests are refused with INVALID_ARGUMENT and a reason
word (issue 19, point 10), like every other refusal, and the control plane's client outlasts a
daemon restart instead of failing its three attempts inside gRPC's reconnect back-off."""

from __future__ import annotations

import threading

import grpc
import pytest
from conftest import AgentRig
from e2ekit import C

from agent.devlab import DevAgent
from agent.rpc.client import AgentClient, Entry
from agent.rpc.pb import agent_pb2

# A length-delimited field 1 that promises five bytes and brings two: no message parses it.
UNDECODABLE = b"\x0a\x05ab"


@pytest.fixture(scope="module")
def rig(shared: AgentRig) -> AgentRig:
    return shared


def test_undecodable_get_state_is_invalid_argument_malformed_request(rig: AgentRig) -> None:
    answer = rig.raw.send_bytes("GetState", UNDECODABLE)
    assert (answer.code, answer.reason) == (C.INVALID_ARGUMENT, "malformed_request")


def test_undecodable_watch_events_is_invalid_argument_malformed_request(rig: AgentRig) -> None:
    method = rig.raw.channel.unary_stream(
        "/vicifast.agent.v1.FirewallAgent/WatchEvents",
        request_serializer=lambda b: b,
        response_deserializer=agent_pb2.AgentEvent.FromString,
    )
    with pytest.raises(grpc.RpcError) as caught:
        list(method(UNDECODABLE, timeout=10))
    err = caught.value
    assert err.code() == C.INVALID_ARGUMENT
    assert (err.details() or "").split(":", 1)[0] == "malformed_request"


def test_a_decodable_get_state_still_answers(rig: AgentRig) -> None:
    assert rig.raw.state().agent_id == rig.agent.agent_id


def test_client_allow_outlasts_a_daemon_restart(agent: DevAgent, client: AgentClient) -> None:
    client.retry_window_s = 60  # a loaded machine may take its time restarting
    assert len(client.allow([Entry("198.18.7.1")]).results) == 1
    agent.stop()
    # The listener is gone: the channel fails its reconnects and backs off meanwhile.
    with pytest.raises(grpc.RpcError):
        client._stub.GetState(agent_pb2.GetStateRequest(), timeout=2)
    starter = threading.Thread(target=agent.start, name="restart")
    starter.start()
    try:
        result = client.allow([Entry("198.18.7.2")])
    finally:
        starter.join()
    assert [r.address for r in result.results] == ["198.18.7.2"]
