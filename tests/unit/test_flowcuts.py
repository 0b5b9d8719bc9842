"""The flow cutter's ordering rule, without a kernel: cuts queued while one runs are cut together,
and of those a source allowed after its newest cut was asked for is spared, while one revoked
again after its re-Allow is cut. A stand-in cut function asks the guard about one flow per
address it is given."""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterator, Sequence

import pytest

from agent.flowcuts import FlowCutter
from agent.model import Address
from agent.rules.conntrack import ForgetResult, Guard

HELD, X, Y, V6 = "198.18.0.1", "198.18.0.2", "198.18.0.3", "2001:db8:0:7::/64"


class StandIn:
    """Cuts one flow per address (its source the address itself), the first call held until
    ``release``; records which flows the guard let go."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        self.calls: list[list[str]] = []
        self.cut: list[str] = []

    def __call__(self, addresses: Sequence[Address], guard: Guard) -> ForgetResult:
        self.calls.append([a.text for a in addresses])
        if len(self.calls) == 1:
            self.entered.set()
            assert self.release.wait(10)
        deleted = spared = 0
        for a in addresses:
            net = a.network
            ip = net.network_address + (1 if net.prefixlen < net.max_prefixlen else 0)
            other = ipaddress.ip_address("198.19.255.254")
            with guard((ip, other)) as go:
                if go:
                    self.cut.append(a.text)
                    deleted += 1
                else:
                    spared += 1
        return ForgetResult(deleted, 0, spared)


@pytest.fixture
def stand_in() -> StandIn:
    return StandIn()


@pytest.fixture
def cutter(stand_in: StandIn) -> Iterator[FlowCutter]:
    c = FlowCutter(stand_in)
    c.start()
    yield c
    stand_in.release.set()
    c.stop()


def test_a_source_allowed_after_its_cut_was_asked_for_is_spared_and_one_revoked_again_is_cut(
    cutter: FlowCutter, stand_in: StandIn
) -> None:
    cutter.cut([Address(HELD)])
    assert stand_in.entered.wait(10)  # the cutter is busy: what follows queues up
    cutter.cut([Address(X)])
    cutter.allowing([Address(X)])  # X allowed again ...
    cutter.cut([Address(X)])  # ... and revoked again: its flows must go
    cutter.cut([Address(Y), Address(V6)])
    cutter.allowing([Address(Y), Address(V6)])  # allowed again after its only cut

    stand_in.release.set()
    assert cutter.wait_idle(10)

    assert stand_in.calls == [[HELD], [X, Y, V6]]  # the queued cuts went together
    assert stand_in.cut == [HELD, X]
    assert (cutter.flows_cut, cutter.spared, cutter.failures) == (2, 2, 0)


def test_an_allow_with_no_cut_outstanding_is_not_recorded(
    cutter: FlowCutter, stand_in: StandIn
) -> None:
    stand_in.release.set()
    cutter.allowing([Address(X)])  # nothing outstanding: the Allow cannot race a cut
    cutter.cut([Address(X)])
    assert cutter.wait_idle(10)
    assert stand_in.cut == [X]
