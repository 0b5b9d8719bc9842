"""End-to-end fixtures: the real daemon process in the lab's server namespace, reached over mTLS.

``agent`` is a started ``DevAgent`` (agent.devlab) living in ``lab.srv``, so real packets from
``lab.cli`` meet its table; ``client`` is the control plane's real client reaching it through a
loopback relay. Everything is torn down after each test.

``shared`` is one daemon for a whole module (its own lab), for tables of refusals: a refused
request changes nothing, and each case asserts exactly that, so the cases cannot interfere.
``AgentRig.running`` (e2ekit) starts more such daemons with other configurations.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from e2ekit import AgentRig, RawCaller, metrics_relay
from netlab import Lab

from agent.devlab import DevAgent, TcpRelay
from agent.rpc.client import AgentClient

_ROOT_CONFTEST = Path(__file__).resolve().parent.parent / "conftest.py"


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


@pytest.fixture
def raw(agent: DevAgent, relay: TcpRelay) -> Iterator[RawCaller]:
    r = RawCaller(agent, relay.address)
    yield r
    r.close()


@pytest.fixture
def metrics(agent: DevAgent) -> Iterator[TcpRelay]:
    r = metrics_relay(agent)
    yield r
    r.close()


# --- one daemon per module ----------------------------------------------------------------


def require_kernel(config: pytest.Config) -> None:
    """tests/conftest.py's rule for module-scoped fixtures: skip, or fail when CI=true."""
    root = next(
        p
        for p in config.pluginmanager.get_plugins()
        if getattr(p, "__file__", None) == str(_ROOT_CONFTEST)
    )
    reason = root.missing_kernel()
    if reason is None:
        return
    if root.in_ci():
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def module_lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    require_kernel(request.config)
    with Lab() as fresh:
        yield fresh


@pytest.fixture(scope="module")
def shared(module_lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentRig]:
    with AgentRig.running(module_lab, tmp_path_factory.mktemp("shared")) as rig:
        yield rig
