"""The watcher slots of the servicer (agent.rpc.service.Watchers): a cap of their own, and which
stream counts as not reading. Pure asyncio, no gRPC."""

from __future__ import annotations

import asyncio

import pytest

from agent.errors import ResourceExhausted
from agent.rpc.service import WATCH_BLOCKED_S, Watchers


def test_streams_over_the_cap_are_too_many_watchers_and_leaving_frees_a_slot() -> None:
    async def run() -> None:
        slots = Watchers(2, lambda: 0)
        first = slots.enter(0)
        slots.enter(0)
        with pytest.raises(ResourceExhausted) as caught:
            slots.enter(0)
        assert caught.value.reason == "too_many_watchers"
        slots.leave(first)
        slots.enter(0)
        assert len(slots) == 2

    asyncio.run(run())


def test_only_a_write_pending_a_while_with_more_than_the_buffer_waiting_is_behind() -> None:
    async def run() -> None:
        version = 1000
        slots = Watchers(8, lambda: version)
        now = asyncio.get_running_loop().time()
        stuck = slots.enter(0)
        stuck.buffer, stuck.writing_since = 100, now - 2 * WATCH_BLOCKED_S
        writing_now = slots.enter(0)  # a burst being written: not stuck
        writing_now.buffer = 100
        idle = slots.enter(0)  # waiting for changes, nothing pending
        idle.buffer = 100
        close = slots.enter(950)  # stuck, but within its buffer
        close.buffer, close.writing_since = 100, now - 2 * WATCH_BLOCKED_S
        await asyncio.sleep(WATCH_BLOCKED_S * 0.6)
        writing_now.writing_since = asyncio.get_running_loop().time()
        await asyncio.sleep(WATCH_BLOCKED_S * 0.6)  # the check ran in between
        assert [w.behind for w in (stuck, writing_now, idle, close)] == [True, False, False, False]

    asyncio.run(run())
