"""Two daemons fighting over one table are reported, not just endured (issue 19, point 5).

Two real daemons with separate state directories manage the same table in one namespace: each
removes the other's entry as "not granted by the agent" and restores its own, many times a
second. Both then say they are unhealthy: the local ``status`` (the sysadmin's CLI), the
``vicifast_agent_drift_repair_storm`` metric, which the alert rules watch, and GetState's
``ruleset_in_sync``.
"""

from __future__ import annotations

import time
from pathlib import Path

from e2ekit import RawCaller, allow_entry, metrics_relay, scrape
from netlab import Lab

from agent.devlab import DevAgent, TcpRelay
from agent.local.client import LocalClient
from agent.verify import STORM_REPAIRS

STORM_WITHIN_S = 20.0


def _storm(agent: DevAgent) -> dict[str, object]:
    return LocalClient(agent.local_socket, timeout=10).call("status")


def test_two_agents_fighting_over_one_table_report_a_repair_storm(
    lab: Lab, agent: DevAgent, relay: TcpRelay, tmp_path: Path
) -> None:
    status = _storm(agent)
    assert status["repair_storm"] is False
    second_socket = tmp_path / "second.sock"
    with DevAgent(
        tmp_path / "second",
        lab.srv.name,
        api_listen="127.0.0.1:17443",
        metrics_listen="127.0.0.1:19617",
        extra_toml=f'[local]\nsocket = "{second_socket}"\n',
    ) as second:
        second.start()
        first_raw, second_relay = RawCaller(agent, relay.address), second.relay()
        second_raw = RawCaller(second, second_relay.address)
        metrics = metrics_relay(agent)
        try:
            assert first_raw.allow(allow_entry("198.18.40.1", 600, "alice")).ok
            assert second_raw.allow(allow_entry("198.18.40.2", 600, "bob")).ok
            deadline = time.monotonic() + STORM_WITHIN_S
            while not (status := _storm(agent))["repair_storm"]:
                assert time.monotonic() < deadline, f"no storm reported: {status}"
            assert int(status["drift_repairs_last_minute"]) >= STORM_REPAIRS
            assert not first_raw.state().ruleset_in_sync  # the kernel keeps differing
            assert scrape(metrics)[("vicifast_agent_drift_repair_storm", frozenset())] == 1
            assert "repair_storm" in agent.log_tail(400)
        finally:
            metrics.close()
            first_raw.close()
            second_raw.close()
            second_relay.close()
            second.stop()
