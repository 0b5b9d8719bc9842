"""Kernel-test fixtures: the agent's table installed in a fresh lab (see tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from netlab import Lab
from tablekit import Rig, open_rig

from agent.engine import Engine
from agent.rules.conntrack import ForgetResult
from agent.state import Limits
from agent.store import Store


@pytest.fixture
def rig(lab: Lab) -> Rig:
    """The agent's table (default ``agent`` profile) installed and probed in ``lab``'s server."""
    return open_rig(lab)


@pytest.fixture
def make_engine(rig: Rig, tmp_path: Path) -> Iterator[Callable[..., Engine]]:
    """Starts writers over ``rig``'s table, each with its own store file (keyword arguments go
    to ``Engine``); each is stopped and its store closed afterwards. Flows are not cut unless
    a ``cut_flows`` is given."""
    made: list[tuple[Engine, Store]] = []

    def make(**kwargs: Any) -> Engine:
        kwargs.setdefault("cut_flows", lambda addresses, guard: ForgetResult(0, 0))
        store = Store.open(tmp_path / f"state-{len(made)}.db")
        engine = Engine(
            store=store,
            table=rig.table,
            limits=Limits(max_entries=1000, set_size={4: 1000, 6: 1000}),
            profiles=("agent",),
            forget_window_ms=180_000,
            **kwargs,
        )
        engine.load()
        engine.start()
        made.append((engine, store))
        return engine

    yield make
    for engine, store in made:
        engine.stop()
        store.close()
