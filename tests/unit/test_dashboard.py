"""The Grafana dashboard (monitoring/dashboard.json) reads right: one unit per axis, words for
0/1 states, panels that do not overlap. (Its metric names: tests/unit/test_monitoring.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

DASHBOARD = Path(__file__).resolve().parents[2] / "monitoring" / "dashboard.json"
PANELS: list[dict[str, Any]] = json.loads(DASHBOARD.read_text())["panels"]
TIMESERIES = [p for p in PANELS if p["type"] == "timeseries"]
# Gauges that are 0 or 1: a stat panel over one shows a word, not a bare number.
ZERO_ONE = ("vicifast_agent_in_sync", "vicifast_agent_shadowing_detected")


def exprs(panel: dict[str, Any]) -> list[str]:
    return [t["expr"] for t in panel["targets"]]


@pytest.mark.parametrize("panel", TIMESERIES, ids=[p["title"] for p in TIMESERIES])
def test_every_time_series_panel_declares_its_unit(panel: dict[str, Any]) -> None:
    assert panel["fieldConfig"]["defaults"].get("unit"), "a unitless axis"


@pytest.mark.parametrize("panel", TIMESERIES, ids=[p["title"] for p in TIMESERIES])
def test_a_duration_is_never_plotted_on_the_same_axis_as_a_rate(panel: dict[str, Any]) -> None:
    quantiles = [e for e in exprs(panel) if e.startswith("histogram_quantile(")]
    if not quantiles:
        return
    assert quantiles == exprs(panel), "durations share a panel with something else"
    assert panel["fieldConfig"]["defaults"]["unit"] == "s"


def test_zero_one_states_are_shown_as_words() -> None:
    shown = {
        gauge: p
        for p in PANELS
        if p["type"] == "stat"
        for gauge in ZERO_ONE
        if any(re.search(rf"\b{gauge}\b", e) for e in exprs(p))
    }
    assert set(shown) == set(ZERO_ONE)
    for gauge, panel in shown.items():
        (mapping,) = panel["fieldConfig"]["defaults"]["mappings"]
        assert mapping["type"] == "value"
        words = {value: option["text"] for value, option in mapping["options"].items()}
        assert set(words) == {"0", "1"}, gauge
        assert all(re.fullmatch(r"[A-Za-z][A-Za-z ]+", w) for w in words.values()), words


def test_panels_do_not_overlap_and_fit_the_24_column_grid() -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in PANELS:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = panel["title"]
