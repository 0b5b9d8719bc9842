"""The writer answers event-loop callers (the gRPC service's) per group, and a caller that gives
up mid-wait changes nothing about its request: it is applied, recorded and answered to nobody,
and the writer goes on. The real table in a lab namespace, the real store in a file."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable

import pytest
from netlab import wait_until
from tablekit import Rig

from agent.engine import Engine
from agent.model import Address, AllowEntry
from agent.outcome import Outcome
from agent.rules.conntrack import ForgetResult, Guard
from agent.state import AllowCmd, Command, RequestMeta, RevokeCmd, StateView


def meta(n: int, rpc: str) -> RequestMeta:
    now = int(time.time() * 1000)
    return RequestMeta(f"req-{n:04d}", rpc, now, now + 60_000, n.to_bytes(32, "big"), "cp")


def allow(rig: Rig, n: int) -> AllowCmd:
    entry = AllowEntry(rig.key(f"198.18.7.{n}").address, "agent", 600, f"agent-{n}")
    return AllowCmd(meta(n, "Allow"), (entry,))


class HeldWriter:
    """Keeps the writer busy with a task until released, so requests queue up behind it."""

    def __init__(self, engine: Engine) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=engine.run_task, args=(self._hold,))

    def _hold(self, view: StateView) -> tuple[StateView, list[object], None]:
        self.entered.set()
        self.release.wait(30)
        return view, [], None

    def __enter__(self) -> HeldWriter:
        self._thread.start()
        assert self.entered.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self._thread.join(30)


@pytest.fixture
def engine(make_engine: Callable[..., Engine]) -> Engine:
    return make_engine()


def in_set(rig: Rig) -> set[str]:
    return {key.address.text for key in rig.table.read_elements()}


def test_event_loop_callers_queued_together_each_get_their_own_answer(
    rig: Rig, engine: Engine
) -> None:
    commands: list[Command] = [allow(rig, n) for n in range(1, 9)]

    async def callers() -> list[Outcome]:
        with HeldWriter(engine):
            calls = [asyncio.create_task(engine.submit_async(c)) for c in commands]
            await asyncio.sleep(0)  # every call is queued behind the held writer
        return list(await asyncio.gather(*calls))

    outcomes = asyncio.run(callers())

    assert [o.request_id for o in outcomes] == [c.meta.request_id for c in commands]
    assert sorted(o.state_version for o in outcomes) == list(range(1, 9))
    assert in_set(rig) == {f"198.18.7.{n}" for n in range(1, 9)}


def test_a_caller_that_gives_up_leaves_its_request_applied_and_the_writer_going(
    rig: Rig, engine: Engine
) -> None:
    async def give_up() -> None:
        with HeldWriter(engine):
            call = asyncio.create_task(engine.submit_async(allow(rig, 1)))
            await asyncio.sleep(0)  # queued behind the held writer
            call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call

    asyncio.run(give_up())
    later = engine.submit(allow(rig, 2))  # the writer answers the next request

    assert later.state_version == 2
    assert in_set(rig) == {"198.18.7.1", "198.18.7.2"}
    assert engine.store.lookup_request("req-0001") is not None  # recorded, answerable on retry


def test_a_revoke_is_answered_before_the_flows_of_its_sources_are_cut(
    rig: Rig, make_engine: Callable[..., Engine]
) -> None:
    """The sets drop a revoked source at once; its conntrack flows, which take a walk over the
    conntrack table to find, are cut after its caller has the answer."""
    answered, cut_done = threading.Event(), threading.Event()
    cuts: list[tuple[list[str], bool]] = []

    def cut_flows(addresses: Iterable[Address], guard: Guard) -> ForgetResult:
        cuts.append(([a.text for a in addresses], answered.wait(5)))
        cut_done.set()
        return ForgetResult(deleted=2, failed=1)

    engine = make_engine(cut_flows=cut_flows)
    address = rig.key("198.18.7.1").address

    async def caller() -> Outcome:
        await engine.submit_async(allow(rig, 1))
        outcome = await engine.submit_async(RevokeCmd(meta(2, "Revoke"), (address,), "", ""))
        answered.set()
        return outcome

    outcome = asyncio.run(caller())

    assert [r.address for r in outcome.results] == ["198.18.7.1"]
    assert cut_done.wait(10)
    assert cuts == [(["198.18.7.1"], True)]  # one cut, begun once the caller had its answer
    # What the cut reported is added to the totals the metrics read.
    wait_until(
        lambda: (engine.flows_cut, engine.flow_cut_failures) == (2, 1),
        timeout=5,
        what="the cut's figures in the engine's totals",
    )
