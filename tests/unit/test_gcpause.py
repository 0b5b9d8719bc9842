"""The collector pause: overlapping pauses, and the collector's state before the first."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest

from agent.gcpause import collector_paused


@pytest.fixture(autouse=True)
def collector_on() -> Iterator[None]:
    gc.enable()
    yield
    gc.enable()


def test_the_collector_is_off_inside_and_on_again_after() -> None:
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_overlapping_pauses_on_two_threads_end_with_the_last() -> None:
    first_in, second_done = threading.Event(), threading.Event()
    seen: list[bool] = []

    def first() -> None:
        with collector_paused():
            first_in.set()
            second_done.wait(10)
            seen.append(gc.isenabled())  # the other pause ended, this one still holds

    worker = threading.Thread(target=first)
    worker.start()
    assert first_in.wait(10)
    with collector_paused():
        pass
    second_done.set()
    worker.join(10)
    assert seen == [False]
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off() -> None:
    gc.disable()
    with collector_paused():
        pass
    assert not gc.isenabled()


def test_the_collector_comes_back_when_the_block_raises() -> None:
    with pytest.raises(RuntimeError), collector_paused():
        raise RuntimeError("boom")
    assert gc.isenabled()
