"""Watchers cannot starve the API (issue 19, point 4; PROTOCOL.md, WatchEvents).

Event streams have their own cap (``[api] max_watchers``; over it ``RESOURCE_EXHAUSTED
too_many_watchers``), apart from ``max_concurrent_rpcs``: with every watcher slot taken, Allow and
GetState still answer. A watcher that stops reading gets ``RESYNC_REQUIRED`` and the end of its
stream once it has fallen ``watch_buffer_events`` behind, or ``RESOURCE_EXHAUSTED watcher_stalled``
once a write has waited ``watch_stall_timeout_s``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
from conftest import AgentRig
from e2ekit import C, allow_entry
from grpc_health.v1 import health_pb2, health_pb2_grpc
from netlab import Lab

from agent.devlab import DevAgent
from agent.rpc.pb import agent_pb2, agent_pb2_grpc
from agent.rpc.service import WATCH_BLOCKED_S

MAX_WATCHERS = 6
BUFFER = 50
STALL_S = 8
KIND = agent_pb2.AgentEvent.Kind


def _limits(dev: DevAgent) -> None:
    dev.write_config(
        dev.config_text().replace(
            "[api]\n",
            "[api]\nmax_concurrent_rpcs = 2\n"
            f"max_watchers = {MAX_WATCHERS}\nwatch_buffer_events = {BUFFER}\n"
            f"watch_stall_timeout_s = {STALL_S}\n",
        )
    )


@pytest.fixture(scope="module")
def rig(module_lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentRig]:
    with AgentRig.running(
        module_lab,
        tmp_path_factory.mktemp("watchers"),
        table="watchers",
        api_listen="127.0.0.1:7446",
        metrics_listen="127.0.0.1:9620",
        configure=_limits,
    ) as rig:
        assert rig.raw.allow(allow_entry("198.18.40.1")).ok
        yield rig


def _channel(rig: AgentRig, *, small_window: bool = False) -> grpc.Channel:
    p = rig.agent.pki
    creds = grpc.ssl_channel_credentials(
        root_certificates=p.ca_cert.read_bytes(),
        private_key=p.client.key.read_bytes(),
        certificate_chain=p.client.cert.read_bytes(),
    )
    options: list[tuple[str, str | int]] = [("grpc.ssl_target_name_override", "localhost")]
    if small_window:
        # The window stays at HTTP/2's 64 KiB: a few hundred unread events fill it.
        options.append(("grpc.http2.bdp_probe", 0))
    return grpc.secure_channel(rig.relay.address, creds, options=options)


def _watch(
    channel: grpc.Channel, since: int = 0, timeout: float = 60
) -> Iterator[agent_pb2.AgentEvent]:
    stub = agent_pb2_grpc.FirewallAgentStub(channel)
    stream: Iterator[agent_pb2.AgentEvent] = stub.WatchEvents(
        agent_pb2.WatchEventsRequest(since_state_version=since), timeout=timeout
    )
    return stream


def _refusal(stream: Iterator[agent_pb2.AgentEvent]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        next(stream)
    err = caught.value
    return err.code(), (err.details() or "").split(":", 1)[0]


def _allow_many(rig: AgentRig, base: int, count: int) -> None:
    entries = [allow_entry(f"198.18.{base + i // 250}.{i % 250 + 1}") for i in range(count)]
    answer = rig.raw.allow(*entries)
    assert answer.ok, answer


def test_watchers_over_the_cap_get_too_many_watchers_and_the_api_keeps_answering(
    rig: AgentRig,
) -> None:
    channel = _channel(rig)
    try:
        streams = [_watch(channel) for _ in range(MAX_WATCHERS)]
        for s in streams:
            assert next(s).state_version >= 1  # open: the retained history arrives
        assert _refusal(_watch(channel)) == (C.RESOURCE_EXHAUSTED, "too_many_watchers")
        health = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
        assert _refusal(health) == (C.RESOURCE_EXHAUSTED, "too_many_watchers")
        # max_concurrent_rpcs = 2 and six streams open: the API's own capacity is intact.
        for i in range(4):
            assert rig.raw.allow(allow_entry(f"198.18.41.{i + 1}")).ok
        assert rig.raw.state().state_version >= 5
        for s in streams:
            s.cancel()  # type: ignore[attr-defined]
        # The slots are given back.
        deadline = time.monotonic() + 10
        while True:
            again = _watch(channel)
            try:
                next(again)
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, "watcher slots were not released"
        again.cancel()  # type: ignore[attr-defined]
    finally:
        channel.close()


def test_a_watcher_that_stops_reading_gets_resync_required_and_its_stream_ends(
    rig: AgentRig,
) -> None:
    channel = _channel(rig, small_window=True)
    try:
        since = rig.raw.state().state_version
        stream = _watch(channel, since)
        # 2,000 events (about 200 KB) while it reads nothing: its window fills after a few
        # hundred, and the writes wait while the rest keep coming.
        for batch in range(8):
            _allow_many(rig, 50 + batch, 250)
        # It stays away a while (the behaviour under test), less than its stall timeout.
        time.sleep(4 * WATCH_BLOCKED_S)
        events = list(stream)  # ends: no DEADLINE_EXCEEDED
        assert events[-1].kind == KIND.RESYNC_REQUIRED
        assert "behind" in events[-1].detail
        delivered = [e for e in events if e.kind == KIND.ADDED]
        assert BUFFER < len(delivered) < 2000
        assert [e.state_version for e in delivered] == list(
            range(since + 1, since + 1 + len(delivered))
        )
    finally:
        channel.close()


def test_a_watcher_that_never_reads_is_ended_after_the_stall_timeout(rig: AgentRig) -> None:
    channel = _channel(rig, small_window=True)
    try:
        stream = _watch(channel, rig.raw.state().state_version)
        _allow_many(rig, 70, 2000)  # one group of 2,000 events: more than the window holds
        started = time.monotonic()
        time.sleep(STALL_S + 2)  # the point of the test: a reader that does not read
        with pytest.raises(grpc.RpcError) as caught:
            for _ in stream:
                pass
        assert caught.value.code() == C.RESOURCE_EXHAUSTED
        assert (caught.value.details() or "").startswith("watcher_stalled")
        assert time.monotonic() - started < 60
        # Its slot is free again: a fresh watcher opens.
        fresh = _watch(channel)
        assert next(fresh).state_version >= 1
        fresh.cancel()  # type: ignore[attr-defined]
    finally:
        channel.close()


def test_a_reading_watcher_takes_a_burst_far_over_its_buffer_whole(rig: AgentRig) -> None:
    channel = _channel(rig)
    try:
        since = rig.raw.state().state_version
        stream = _watch(channel, since)
        _allow_many(rig, 80, 1000)  # one group: 1,000 events at once, 20 times the buffer
        got = [next(stream) for _ in range(1000)]
        assert {e.kind for e in got} == {KIND.ADDED}
        assert [e.state_version for e in got] == list(range(since + 1, since + 1001))
        stream.cancel()  # type: ignore[attr-defined]
    finally:
        channel.close()
