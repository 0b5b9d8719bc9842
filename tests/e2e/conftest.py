"""End-to-end fixtures: the real daemon process in the lab's server namespace, reached over mTLS.

``agent`` is a started ``DevAgent`` (agent.devlab) living in ``lab.srv``, so real packets from
``lab.cli`` meet its table; ``client`` is the control plane's real client reaching it through a
loopback relay. Everything is torn down after each test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from netlab import Lab

from agent.devlab import DevAgent, TcpRelay
from agent.rpc.client import AgentClient


@pytest.fixture
def agent(lab: Lab, tmp_path: Path) -> Iterator[DevAgent]:
    with DevAgent(tmp_path / "agent", lab.srv.name) as dev:
        dev.start()
        yield dev


@pytest.fixture
def relay(agent: DevAgent) -> Iterator[TcpRelay]:
    r = agent.relay()
    yield r
    r.close()


@pytest.fixture
def client(agent: DevAgent, relay: TcpRelay) -> Iterator[AgentClient]:
    c = agent.client(relay.address)
    yield c
    c.close()
