"""Rate-limited log lines (agent.ratelog): a burst, then a steady rate, and a count of the rest."""

from __future__ import annotations

import logging

import pytest

from agent.ratelog import RateLimit, RateLimitedLog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_passes_then_one_line_per_refill_with_the_count_held_back() -> None:
    clock = Clock()
    limit = RateLimit(per_minute=60, burst=3, clock=clock)
    assert [limit.take() for _ in range(5)] == [0, 0, 0, None, None]
    clock.now += 0.5
    assert limit.take() is None
    clock.now += 0.5
    assert limit.take() == 3  # three held back since the last line
    assert limit.take() is None


def test_the_bucket_never_holds_more_than_the_burst() -> None:
    clock = Clock()
    limit = RateLimit(per_minute=60, burst=2, clock=clock)
    clock.now += 3600
    assert [limit.take() for _ in range(3)] == [0, 0, None]


@pytest.mark.parametrize(("per_minute", "burst"), [(0, 1), (1, 0)])
def test_a_limit_needs_a_rate_and_a_burst(per_minute: float, burst: int) -> None:
    with pytest.raises(ValueError, match="rate limit"):
        RateLimit(per_minute, burst)


def test_kinds_have_their_own_buckets_and_lines_carry_fields(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    log = RateLimitedLog(logging.getLogger("test.ratelog"), per_minute=60, burst=1, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.ratelog"):
        assert log.emit(logging.WARNING, "a", "refused %s", "x", fields={"REASON": "x"})
        assert not log.emit(logging.WARNING, "a", "refused %s", "x")
        assert log.emit(logging.INFO, "b", "other")
        clock.now += 1
        assert log.emit(logging.WARNING, "a", "refused %s", "y")
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert lines == [
        (logging.WARNING, "refused x"),
        (logging.INFO, "other"),
        (logging.WARNING, "refused y (1 more like it not logged)"),
    ]
    assert caplog.records[0].REASON == "x"
