"""Supervision with the real daemon: every loop survives a fault, a stuck loop starves the
watchdog, and descriptor exhaustion degrades a turn, never a loop.

The daemon runs as systemd would run it: WATCHDOG_USEC set, READY/WATCHDOG/STATUS read from a
NOTIFY_SOCKET (``agent.devlab.NotifyListener``). Faults are injected through the test-only seam
(``VICIFAST_AGENT_FAULT_DIR``, ``agent.supervise.FaultInjector``) or, for EMFILE, for real: the
daemon's RLIMIT_NOFILE is lowered under it (``prlimit``) so that every new descriptor fails.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from e2ekit import metrics_relay, scrape, value
from lifecycle_kit import allow_set_addresses
from netlab import CommandFailed, Lab

from agent.devlab import DevAgent
from agent.rpc.client import Entry
from agent.supervise import LOOP_DEADLINES

LOOPS = ("writer", "expiry", "conntrack", "verify", "monitor", "grpc", "local", "metrics", "main")
# A hang of each loop lasts its deadline (agent.supervise.LOOP_DEADLINES) and 2.5 s more.
HANGS = tuple((loop, LOOP_DEADLINES[loop] + 2.5) for loop in LOOPS)


@pytest.fixture
def supervised(lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[DevAgent]:
    faults = tmp_path / "faults"
    faults.mkdir()
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("VICIFAST_AGENT_FAULT_DIR", str(faults))
    with DevAgent(tmp_path / "agent", lab.srv.name) as dev:
        dev.start()
        yield dev


def poll_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)  # polling a condition with a deadline
    return True


def allowed(lab: Lab, dev: DevAgent, address: str) -> bool:
    """Whether the kernel's allow set holds ``address`` (False while the table is gone)."""
    try:
        return address in allow_set_addresses(lab.srv, dev.table, "allow4_agent")
    except CommandFailed:
        return False


def fault_dir(dev: DevAgent) -> Path:
    return dev.directory.parent / "faults"


def inject(dev: DevAgent, loop: str, order: str) -> None:
    """Leave an order for ``loop`` and wait until a turn of it took it."""
    path = fault_dir(dev) / loop
    path.write_text(order)
    assert poll_until(lambda: not path.exists(), timeout=10.0), f"{loop} never turned"


def pings_stop(dev: DevAgent, *, quiet: float, within: float) -> bool:
    """Whether a ``quiet`` s gap without WATCHDOG=1 begins within ``within`` s."""
    assert dev.notify is not None
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            dev.notify.wait_for("WATCHDOG", "1", timeout=quiet)
        except TimeoutError:
            return True
    return False


def status_says(dev: DevAgent, predicate: Callable[[str], bool], timeout: float) -> bool:
    assert dev.notify is not None
    notify = dev.notify
    return poll_until(
        lambda: any(predicate(m.get("STATUS", "")) for m in list(notify.messages)), timeout
    )


def test_every_loop_survives_an_unexpected_exception_and_the_watchdog_stays_fed(
    supervised: DevAgent, lab: Lab
) -> None:
    dev = supervised
    for loop in LOOPS:
        inject(dev, loop, "raise EMFILE" if loop in ("verify", "local", "conntrack") else "raise")
    assert not pings_stop(dev, quiet=2.0, within=4.0), "a loop stopped after its fault"

    log = dev.log_path.read_text()
    for loop in LOOPS:
        assert f"LOOP='{loop}'" in log, loop
    assert "REASON='loop_fault'" in log
    relay = metrics_relay(dev)
    try:
        samples = scrape(relay)
    finally:
        relay.close()
    for loop in LOOPS:
        assert value(samples, "vicifast_agent_loop_faults_total", loop=loop) == 1, loop
        assert value(samples, "vicifast_agent_loop_stalled", loop=loop) == 0, loop

    # Each loop still does its work: requests, drift repair.
    api = dev.relay()
    try:
        with dev.client(api.address) as c:
            c.allow([Entry(lab.addr.client4, 600, "a")])
            lab.srv.nft("flush", "ruleset")
            assert poll_until(lambda: allowed(lab, dev, lab.addr.client4), 5.0)
            assert [e.address for e in c.state().entries] == [lab.addr.client4]
    finally:
        api.close()


def test_a_stuck_loop_starves_the_watchdog_and_status_names_it(supervised: DevAgent) -> None:
    dev = supervised
    assert dev.notify is not None
    for loop, hang_s in HANGS:
        dev.notify.wait_for("WATCHDOG", "1", timeout=3.0)
        dev.notify.messages.clear()  # only this hang's STATUS lines count
        dev.notify.drain()
        inject(dev, loop, f"hang {hang_s}")
        assert pings_stop(dev, quiet=1.5, within=hang_s), f"{loop} stuck, watchdog still fed"
        if loop != "main":  # the main loop is what sends STATUS (and the pings)
            assert status_says(dev, lambda s, lp=loop: "STALLED" in s and lp in s, 3.0), loop
        # Once the call returns the loop turns again, and so does the watchdog.
        dev.notify.wait_for("WATCHDOG", "1", timeout=hang_s + 5.0)
        if loop != "main":
            assert status_says(dev, lambda s: bool(s) and "STALLED" not in s, 5.0), loop


def test_descriptor_exhaustion_degrades_a_turn_never_a_loop(supervised: DevAgent, lab: Lab) -> None:
    """EMFILE for real: while no new descriptor can be opened, a flushed ruleset cannot be
    repaired; once descriptors are back, it is, without a restart."""
    dev = supervised
    api = dev.relay()
    try:
        with dev.client(api.address) as c:
            c.allow([Entry(lab.addr.client4, 600, "a")])
            pid = dev.pid
            soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (3, hard))  # every new fd: EMFILE
            try:
                lab.srv.nft("flush", "ruleset")
                # Seen as a loop's fault (FAULT=EMFILE), or, where the check itself names it, as
                # a failed check with its reason word: either way one turn, not the loop.
                assert poll_until(
                    lambda: any(
                        word in dev.log_path.read_text()
                        for word in ("FAULT='EMFILE'", "REASON='unreadable_listing'")
                    ),
                    10.0,
                )
            finally:
                resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
            assert poll_until(lambda: allowed(lab, dev, lab.addr.client4), 10.0), (
                "the table was never repaired: a loop died on EMFILE"
            )
            assert dev.process is not None
            assert dev.process.poll() is None
            assert [e.address for e in c.state().entries] == [lab.addr.client4]
            c.allow([Entry(lab.addr.client4_alt, 600, "b")])
    finally:
        api.close()
    assert not pings_stop(dev, quiet=3.0, within=4.0)
