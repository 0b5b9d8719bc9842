"""The writer's group-commit delay: it waits only for requests concurrent callers are about to
send, never for a lone caller, and never past the linger after the group's first request."""

from __future__ import annotations

import pytest

from agent.grouping import GROUP_LINGER_S, linger_left

STARTED = 100.0


@pytest.mark.parametrize(
    ("gathered", "expected", "elapsed", "left"),
    [
        # A lone caller (or the first group) never waits.
        (1, 0, 0.0, 0.0),
        (1, 1, 0.0, 0.0),
        # Fewer than last time: the rest of the linger.
        (1, 2, 0.0, GROUP_LINGER_S),
        (3, 12, 0.002, GROUP_LINGER_S - 0.002),
        # As many as (or more than) last time: apply now.
        (12, 12, 0.001, 0.0),
        (20, 12, 0.001, 0.0),
        # The linger is over, however few came.
        (3, 12, GROUP_LINGER_S, 0.0),
        (3, 12, 1.0, 0.0),
        # Only tasks so far (no request): nothing to wait for.
        (0, 12, 0.0, 0.0),
    ],
)
def test_the_writer_waits_only_for_the_callers_it_expects(
    gathered: int, expected: int, elapsed: float, left: float
) -> None:
    assert linger_left(gathered, expected, STARTED, STARTED + elapsed) == pytest.approx(left)


def test_the_linger_is_a_few_milliseconds() -> None:
    # It is added to answers under load: an order below the 10 ms p99 an Allow may take.
    assert 0 < GROUP_LINGER_S <= 0.005
