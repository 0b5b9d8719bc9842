"""Repairs that keep coming are reported as unhealthy (issue 19, point 5): the pure rate over
the last minute (``agent.verify.RepairRate``), the systemd status line and the local
``status`` as a sysadmin reads them."""

from __future__ import annotations

import pytest

from agent.admin import format_status
from agent.daemon import Status
from agent.verify import STORM_REPAIRS, STORM_WINDOW_S, RepairRate


@pytest.mark.parametrize(
    ("repairs_at", "now", "count", "stormy"),
    [
        ([], 0.0, 0, False),
        ([1.0], 2.0, 1, False),  # a sysadmin's flush
        ([1.0, 5.0, 9.0], 10.0, 3, False),  # nftables reloaded a few times
        ([i / 75 for i in range(75)], 1.0, 75, True),  # two agents: ~75 repairs a second
        ([float(i) for i in range(STORM_REPAIRS)], 30.0, STORM_REPAIRS, True),
        (
            [float(i) for i in range(STORM_REPAIRS)],
            STORM_REPAIRS + STORM_WINDOW_S,
            0,
            False,
        ),  # calmed
        ([0.0, 61.0], 61.5, 1, False),  # the first one left the window
    ],
)
def test_repairs_within_the_last_minute_are_counted(
    repairs_at: list[float], now: float, count: int, stormy: bool
) -> None:
    rate = RepairRate()
    for at in repairs_at:
        rate.add(at)
    assert rate.count(now) == count
    assert rate.stormy(now) is stormy


def test_the_systemd_status_line_says_unhealthy_during_a_storm() -> None:
    calm = Status(entries=3, in_sync=True, resync_required=False, shadowed=False)
    assert "UNHEALTHY" not in calm.line()
    storm = Status(
        entries=3, in_sync=True, resync_required=False, shadowed=False, repair_storm=True
    )
    assert "UNHEALTHY" in storm.line()


_STATUS = {
    "agent_id": "a1",
    "version": "0.1.0",
    "pid": 42,
    "started_at_ms": 0,
    "now_ms": 7_200_000,
    "state_version": 17,
    "entries": 3,
    "local_entries": 1,
    "entries_by_profile": {"agent": 3},
    "in_sync": True,
    "last_verified_at_ms": 7_190_000,
    "drift_repairs": 4000,
    "drift_repairs_last_minute": 3000,
    "repair_storm": True,
    "shadowing": [],
    "table": "inet vicifast",
    "listen": {"api": "[::]:7443", "metrics": "127.0.0.1:9617", "local": "/run/x.sock"},
}


def test_the_local_status_says_unhealthy_during_a_storm() -> None:
    text = format_status(_STATUS)
    assert "UNHEALTHY" in text
    assert "3000 drift repairs in the last minute" in text
    assert "UNHEALTHY" not in format_status({**_STATUS, "repair_storm": False})
