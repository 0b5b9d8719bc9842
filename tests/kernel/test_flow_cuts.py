"""Flows of revoked sources are cut off the writer: a revoke's cut never holds the next request,
and a source allowed again keeps the flows it opened after its new Allow, however late the cut
of its revoke runs. The real table and real conntrack flows in a lab namespace."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from netlab import Family, wait_until
from tablekit import Rig

from agent.engine import Engine
from agent.model import Address, AllowEntry
from agent.rules.conntrack import ForgetResult, Guard, forget_flows
from agent.state import AllowCmd, RequestMeta, RevokeCmd

_ids = iter(range(1, 1_000_000))


def meta(rpc: str) -> RequestMeta:
    n = next(_ids)
    now = int(time.time() * 1000)
    return RequestMeta(f"cut-{n:04d}", rpc, now, now + 60_000, n.to_bytes(32, "big"), "cp")


def allow(*addresses: Address) -> AllowCmd:
    return AllowCmd(meta("Allow"), tuple(AllowEntry(a, "agent", 600, "agent-1") for a in addresses))


def revoke(*addresses: Address) -> RevokeCmd:
    return RevokeCmd(meta("Revoke"), tuple(addresses), "", "")


class HeldCuts:
    """A cut function that waits for ``release`` before cutting for real in the lab's server
    namespace: a cut that runs late, after whatever the test does meanwhile."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.started, self.release = threading.Event(), threading.Event()
        self.results: list[ForgetResult] = []

    def __call__(self, addresses: Sequence[Address], guard: Guard) -> ForgetResult:
        self.started.set()
        assert self.release.wait(30)
        result = self.rig.lab.srv.call(forget_flows, addresses, guard)
        self.results.append(result)
        return result


def client(rig: Rig, family: Family) -> Address:
    return rig.key(rig.lab.addr.client(family)).address


def test_a_revoke_whose_cut_is_slow_does_not_hold_the_next_request(
    rig: Rig, make_engine: Callable[..., Engine]
) -> None:
    held = HeldCuts(rig)
    engine = make_engine(cut_flows=held)
    first, second = client(rig, 4), client(rig, 6)
    engine.submit(allow(first))
    try:
        engine.submit(revoke(first))
        assert held.started.wait(10)  # the cut has begun and cannot finish

        # Answered while the cut is still under way (before: the cut ran on the writer).
        outcome = engine.submit(allow(second), timeout=5)

        assert [r.address for r in outcome.results] == [second.text]
    finally:
        held.release.set()
    assert engine.cutter.wait_idle(10)


def test_a_source_allowed_again_keeps_the_flows_it_opens_after_its_new_allow(
    rig: Rig, make_engine: Callable[..., Engine]
) -> None:
    held = HeldCuts(rig)
    engine = make_engine(cut_flows=held)
    again, gone = client(rig, 4), client(rig, 6)
    engine.submit(allow(again, gone))
    with rig.lab.udp_flow(family=4, sport=41001) as old, rig.lab.udp_flow(family=6) as theirs:
        assert old.exchange()
        assert theirs.exchange()
        try:
            engine.submit(revoke(again, gone))
            assert held.started.wait(10)  # the cut is late: it waits for the release
            engine.submit(allow(again), timeout=5)  # the writer did not wait for the cut
            old.close()
            with rig.lab.udp_flow(family=4, sport=41002) as fresh:
                assert fresh.exchange()  # a new flow of the source allowed again
                assert len(rig.lab.srv.conntrack(*fresh.conntrack_args())) == 1
                held.release.set()
                assert engine.cutter.wait_idle(10)

                # The late cut spared the source allowed again and cut the one still revoked.
                assert len(rig.lab.srv.conntrack(*fresh.conntrack_args())) == 1
                assert fresh.exchange()
                assert rig.lab.srv.conntrack(*theirs.conntrack_args()) == []
                assert not theirs.exchange()
        finally:
            held.release.set()
    (result,) = held.results
    assert result.deleted == 1
    assert result.spared >= 1  # the fresh flow, and the old one of the same source if still up


def test_a_cut_that_raises_is_counted_and_the_cutter_goes_on(
    rig: Rig, make_engine: Callable[..., Engine]
) -> None:
    calls: list[list[str]] = []

    def cut_flows(addresses: Sequence[Address], guard: Guard) -> ForgetResult:
        calls.append([a.text for a in addresses])
        if len(calls) == 1:
            raise RuntimeError("injected")
        return ForgetResult(deleted=1, failed=0)

    engine = make_engine(cut_flows=cut_flows)
    first, second = client(rig, 4), client(rig, 6)
    engine.submit(allow(first, second))
    engine.submit(revoke(first))
    engine.submit(revoke(second))

    wait_until(lambda: len(calls) == 2, timeout=10, what="the second cut after a crash")
    assert engine.cutter.wait_idle(10)
    assert (engine.cutter.errors, engine.flow_cut_failures, engine.flows_cut) == (1, 1, 1)
