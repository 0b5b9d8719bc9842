"""The real daemon's first scrape: every known series at 0, the process figures, no ``_created``;
and a local-socket request counted like a remote one. Scraped through a devlab relay, as a
local Prometheus would read it.
"""

from __future__ import annotations

import os

from e2ekit import scrape, scrape_text, value
from netlab import Lab

from agent.devlab import DevAgent, TcpRelay
from agent.local.client import LocalClient
from agent.rpc.client import AgentClient


def test_a_fresh_daemon_exports_every_known_series_at_zero(
    agent: DevAgent, metrics: TcpRelay
) -> None:
    samples = scrape(metrics)

    for rpc in ("Allow", "Revoke", "Sync", "Erase", "GetState", "WatchEvents", "Health.Check"):
        for code in ("OK", "UNAUTHENTICATED", "PERMISSION_DENIED", "INVALID_ARGUMENT"):
            assert value(samples, "vicifast_agent_requests_total", rpc=rpc, code=code) == 0
    for reason in ("unknown_key", "bad_signature", "caller_not_allowed"):
        assert value(samples, "vicifast_agent_auth_failures_total", reason=reason) == 0
    for reason in ("kernel_refused", "set_full", "element_conflict"):
        assert (
            value(samples, "vicifast_agent_kernel_transaction_failures_total", reason=reason) == 0
        )
    assert value(samples, "vicifast_agent_local_requests_total", op="allow", code="OK") == 0


def test_the_process_figures_are_the_daemons_and_nothing_is_created(
    agent: DevAgent, metrics: TcpRelay
) -> None:
    text = scrape_text(metrics)
    samples = scrape(metrics)

    fds = len(os.listdir(f"/proc/{agent.pid}/fd"))
    open_fds = value(samples, "process_open_fds")
    assert open_fds is not None
    assert abs(open_fds - fds) <= 5  # a scrape's own connection and threads come and go
    assert value(samples, "process_max_fds") == _soft_nofile(agent.pid)
    assert (value(samples, "process_resident_memory_bytes") or 0) > 10 * 2**20
    assert "_created" not in text


def _soft_nofile(pid: int) -> float:
    with open(f"/proc/{pid}/limits") as limits:
        for line in limits:
            if line.startswith("Max open files"):
                return float(line.split()[3])
    raise AssertionError("no 'Max open files' in /proc/PID/limits")


def test_a_local_socket_request_is_counted_like_a_remote_one(
    lab: Lab, agent: DevAgent, client: AgentClient, metrics: TcpRelay
) -> None:
    client.state()
    LocalClient(agent.local_socket).call("status")
    LocalClient(agent.local_socket).call("list")

    samples = scrape(metrics)

    assert value(samples, "vicifast_agent_requests_total", rpc="GetState", code="OK") == 1
    assert value(samples, "vicifast_agent_local_requests_total", op="status", code="OK") == 1
    assert value(samples, "vicifast_agent_local_requests_total", op="list", code="OK") == 1
