"""Supervision of the daemon's loops: a fault is survived, logged with a reason word and counted;
a loop without progress within its deadline is reported stalled (and starves the watchdog).

The bookkeeping is tested with a hand-moved clock; the loops themselves (the writer with its
expiry and conntrack cuts, verification, the local socket, the metrics listener) in-process,
with faults raised where they really happen (EMFILE from a store, a flow cut, a netlink socket).
"""

from __future__ import annotations

import errno
import logging
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry
from test_admin import STATUS  # the admin tests' sample status

from agent.admin import format_status
from agent.config import LocalConfig, MetricsConfig
from agent.daemon import Status
from agent.doctor import Level
from agent.engine import Engine
from agent.errors import InvalidArgument, Unavailable
from agent.local.access import Peer
from agent.local.client import LocalClient
from agent.local.server import LocalServer
from agent.local.service import check_loops
from agent.local.wire import LocalRequest
from agent.metrics.http import MetricsListener
from agent.metrics.loops import LoopCollector
from agent.model import Address, AllowEntry
from agent.reconcile import Convergence
from agent.rules.conntrack import ForgetResult
from agent.rules.monitor import NftMonitor, Touch
from agent.rules.table import FirewallTable
from agent.state import AllowCmd, Limits, RequestMeta, RevokeCmd
from agent.store import Store
from agent.supervise import (
    BACKOFF_MAX_S,
    LOOP_DEADLINES,
    FaultInjector,
    Supervision,
    fault_reason,
)
from agent.verify import Verifier

ADDRESS = "198.18.7.1"  # must never reach a log line


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def emfile() -> OSError:
    return OSError(errno.EMFILE, f"Too many open files for {ADDRESS}")


def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


# --- the bookkeeping (pure) ------------------------------------------------------------------


def test_every_loop_has_a_fault_count_from_the_start() -> None:
    sup = Supervision()
    assert sup.faults() == dict.fromkeys(LOOP_DEADLINES, 0)
    assert {
        "writer",
        "expiry",
        "conntrack",
        "verify",
        "monitor",
        "grpc",
        "local",
        "metrics",
        "main",
    } <= set(sup.names)


def test_a_fault_is_counted_and_backed_off_more_each_time_until_a_turn_completes() -> None:
    clock = Clock()
    sup = Supervision(clock=clock)
    delays = [sup.fault("verify", emfile()) for _ in range(8)]
    assert delays == sorted(delays)
    assert delays[0] < delays[1]
    assert delays[-1] == BACKOFF_MAX_S
    assert sup.faults()["verify"] == 8
    assert not sup.due("verify")
    clock.now += BACKOFF_MAX_S
    assert sup.due("verify")
    sup.beat("verify")
    assert sup.fault("verify", emfile()) == delays[0]


def test_guarded_turn_beats_when_it_completes_and_reports_a_back_off_when_it_raises() -> None:
    clock = Clock()
    sup = Supervision(clock=clock)
    sup.watch("local")

    def boom() -> None:
        raise emfile()

    assert sup.guarded("local", lambda: None) == 0.0
    assert sup.guarded("local", boom) > 0
    assert sup.faults()["local"] == 1


@pytest.mark.parametrize("loop", sorted(LOOP_DEADLINES))
def test_a_loop_without_progress_past_its_deadline_is_stalled(loop: str) -> None:
    clock = Clock()
    sup = Supervision(clock=clock)
    for name in sup.names:
        sup.watch(name)
    deadline = LOOP_DEADLINES[loop]
    for _ in range(int(deadline) + 3):  # every other loop keeps beating
        clock.now += 1.0
        for name in sup.names:
            if name != loop:
                sup.beat(name)
    assert sup.stalled() == (loop,)
    sup.beat(loop)
    assert sup.stalled() == ()


def test_a_loop_that_fails_every_turn_makes_no_progress() -> None:
    clock = Clock()
    sup = Supervision(clock=clock)
    sup.watch("verify")
    while clock.now < 1000.0 + LOOP_DEADLINES["verify"] + 1:
        clock.now += sup.guarded("verify", lambda: (_ for _ in ()).throw(emfile()))
    assert sup.stalled() == ("verify",)


def test_unwatched_loops_are_never_stalled() -> None:
    clock = Clock()
    sup = Supervision(clock=clock)
    sup.watch("local")
    sup.unwatch("local")  # stopped on purpose
    clock.now += 1000
    assert sup.stalled() == ()


def test_a_fault_is_logged_with_reason_and_place_never_the_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sup = Supervision()

    def turn() -> None:
        raise InvalidArgument("invalid_address", f"{ADDRESS} is not allowed")

    with caplog.at_level(logging.ERROR):
        sup.guarded("writer", turn)
        sup.guarded("verify", lambda: (_ for _ in ()).throw(emfile()))
    assert ADDRESS not in caplog.text
    records = [r for r in caplog.records if getattr(r, "REASON", "") == "loop_fault"]
    assert [(getattr(r, "LOOP", ""), getattr(r, "FAULT", "")) for r in records] == [
        ("writer", "invalid_address"),
        ("verify", "EMFILE"),
    ]
    assert "test_supervise.py" in records[0].getMessage()  # where it was raised


@pytest.mark.parametrize(
    ("exc", "word"),
    [(emfile(), "EMFILE"), (KeyError(ADDRESS), "KeyError"), (OSError("x"), "OSError")],
)
def test_fault_reason_is_a_word(exc: BaseException, word: str) -> None:
    assert fault_reason(exc) == word


def test_loop_metrics_name_every_loop_and_its_faults() -> None:
    clock = Clock()
    sup = Supervision(clock=clock)
    sup.watch("metrics")
    sup.fault("conntrack", emfile())
    clock.now += 60
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LoopCollector(sup))
    for name in sup.names:
        faults = registry.get_sample_value("vicifast_agent_loop_faults_total", {"loop": name})
        assert faults == (1 if name == "conntrack" else 0)
        stalled = registry.get_sample_value("vicifast_agent_loop_stalled", {"loop": name})
        assert stalled == (1 if name == "metrics" else 0)


# --- the test seam ---------------------------------------------------------------------------


def test_fault_injection_is_off_unless_its_directory_is_given() -> None:
    assert FaultInjector.from_env({}) is None
    assert FaultInjector.from_env({"VICIFAST_AGENT_FAULT_DIR": ""}) is None


def test_fault_injection_raises_or_hangs_once_per_order(tmp_path: Path) -> None:
    slept: list[float] = []
    inject = FaultInjector(tmp_path, sleep=slept.append)
    inject("verify")  # no order: nothing
    (tmp_path / "verify").write_text("raise EMFILE\n")
    with pytest.raises(OSError, match="Too many open files") as err:
        inject("verify")
    assert err.value.errno == errno.EMFILE
    inject("verify")  # consumed
    (tmp_path / "writer").write_text("raise")
    with pytest.raises(RuntimeError):
        inject("writer")
    (tmp_path / "local").write_text("hang 7")
    inject("local")
    assert slept == [7.0]


# --- the writer, its expiry and its flow cuts -------------------------------------------------


class NullTable:
    """Stands in for FirewallTable: every transaction succeeds."""

    def apply(self, *args: Any, **kwargs: Any) -> None:
        return None


def meta(n: int, rpc: str) -> RequestMeta:
    now = int(time.time() * 1000)
    return RequestMeta(f"req-{n}", rpc, now, now + 60_000, bytes([n]) * 32)


def make_engine(
    store: Store, cut_flows: Callable[[Any], ForgetResult] | None = None, **kw: Any
) -> Engine:
    extra: dict[str, Any] = {} if cut_flows is None else {"cut_flows": cut_flows}
    return Engine(
        store=store,
        table=cast(FirewallTable, NullTable()),
        limits=Limits(max_entries=100, set_size={4: 100, 6: 100}),
        profiles=("agent",),
        forget_window_ms=60_000,
        **extra,
        **kw,
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "state.db") as s:
        yield s


def alive(engine: Engine) -> bool:
    """Whether the writer still runs a task."""
    try:
        return bool(engine.run_task(lambda v: (v, [], True), timeout=3.0))
    except TimeoutError:
        return False


def allow(n: int, ttl: int = 600) -> AllowCmd:
    entry = AllowEntry(Address.trusted(ADDRESS), "agent", ttl, "alice")
    return AllowCmd(meta(n, "Allow"), (entry,))


def test_writer_survives_emfile_from_a_flow_cut_and_counts_the_cut_as_failed(
    store: Store,
) -> None:
    def cut(addresses: Any, guard: Any) -> ForgetResult:
        raise emfile()

    engine = make_engine(store, cut_flows=cut)
    engine.load()
    engine.start()
    try:
        engine.submit(allow(1))
        engine.submit(RevokeCmd(meta(2, "Revoke"), (Address.trusted(ADDRESS),)))
        assert alive(engine)
        # Cuts run on the flow cutter's thread (the "conntrack" loop) once the writer queued them.
        assert engine.cutter.wait_idle(5.0)
        assert engine.flow_cut_failures == 1
        assert engine.supervision.faults()["conntrack"] == 1
        assert engine.supervision.faults()["writer"] == 0
        engine.submit(allow(3))  # requests still flow
    finally:
        engine.stop()


def test_writer_survives_emfile_while_expiring(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(store)
    engine.load()
    engine.start()
    try:
        engine.submit(allow(1, ttl=1))
        real_commit = store.commit
        failures = [emfile()]

        def commit(*args: Any, **kwargs: Any) -> Any:
            if failures:
                raise failures.pop()
            return real_commit(*args, **kwargs)

        monkeypatch.setattr(store, "commit", commit)
        assert eventually(lambda: not failures, timeout=5.0)
        assert alive(engine)
        assert eventually(lambda: engine.entry_count == 0, timeout=5.0)  # expired on a retry
        assert engine.supervision.faults()["expiry"] == 1
    finally:
        engine.stop()


def test_writer_turn_that_fails_answers_its_callers_and_goes_on(store: Store) -> None:
    raised: list[str] = []

    def inject(name: str) -> None:
        if name == "writer" and not raised:
            raised.append(name)
            raise emfile()

    engine = make_engine(store, supervision=Supervision(injector=inject))
    engine.load()
    engine.start()
    try:
        assert eventually(lambda: bool(raised))
        assert alive(engine)
        assert engine.supervision.faults()["writer"] == 1
    finally:
        engine.stop()


# --- verification and its netlink monitor ----------------------------------------------------


class FakeEngine:
    """Runs verification tasks: the first one fails as a netlink socket would at EMFILE."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def now_ms(self) -> int:
        return int(time.time() * 1000)

    def run_task(self, task: Any) -> Convergence:
        self.calls += 1
        if self.failures:
            self.failures -= 1
            raise emfile()
        return Convergence()


class FakeMonitor:
    """Notifications: each ``wait`` reports lost ones (anything may have changed) or raises."""

    def __init__(self, raises: int = 0) -> None:
        self.raises = raises
        self.waits = 0

    def wait(self, timeout: float | None, wake_fd: int | None = None) -> Touch:
        self.waits += 1
        if self.raises:
            self.raises -= 1
            raise emfile()
        time.sleep(min(timeout or 0.0, 0.01))
        return Touch(lost=True)

    def close(self) -> None:
        pass


def make_verifier(engine: FakeEngine, monitor: FakeMonitor) -> Verifier:
    return Verifier(
        engine=cast(Engine, engine),
        store=cast(Store, None),
        table=cast(FirewallTable, None),
        monitor=cast(NftMonitor, monitor),
        interval_s=3600.0,
        elements_interval_s=3600.0,
    )


def test_verification_survives_emfile_reports_out_of_sync_and_repairs_next_turn() -> None:
    engine = FakeEngine(failures=1)
    verifier = make_verifier(engine, FakeMonitor())
    seen_out_of_sync: list[bool] = []
    verifier.on_change = lambda: seen_out_of_sync.append(verifier.in_sync)
    verifier.start()
    try:
        assert eventually(lambda: engine.calls >= 2), "the verification thread died"
        assert verifier.in_sync
        assert False in seen_out_of_sync
        assert verifier.supervision.faults()["verify"] == 1
    finally:
        verifier.stop()


def test_a_failing_monitor_is_backed_off_from_and_verification_goes_on() -> None:
    engine = FakeEngine(failures=0)
    monitor = FakeMonitor(raises=3)
    verifier = make_verifier(engine, monitor)
    verifier.start()
    try:
        assert eventually(lambda: monitor.waits > 3 and engine.calls >= 2)
        assert verifier.supervision.faults()["monitor"] == 3
        assert verifier.supervision.stalled() == ()
    finally:
        verifier.stop()


# --- the local socket and the metrics listener -------------------------------------------------


class EchoService:
    def handle(self, request: LocalRequest, peer: Peer) -> dict[str, Any]:
        return {"op": request.op}


def test_local_socket_survives_a_fault_in_its_accept_loop(tmp_path: Path) -> None:
    cfg = LocalConfig(socket=tmp_path / "local.sock")
    calls = [0]
    fail_at = [0]

    def config() -> LocalConfig:
        calls[0] += 1
        if calls[0] == fail_at[0]:
            raise emfile()
        return cfg

    server = LocalServer(config, EchoService())  # type: ignore[arg-type]
    server.start()
    try:
        fail_at[0] = calls[0] + 1  # the next look at the configuration fails
        assert eventually(lambda: calls[0] > fail_at[0])
        answer = LocalClient(cfg.socket, timeout=3.0).call("status")
        assert answer == {"op": "status"}
    finally:
        server.stop()


def test_metrics_listener_survives_a_fault_in_its_accept_loop() -> None:
    raised: list[str] = []

    def inject(name: str) -> None:
        if name == "metrics" and not raised:
            raised.append(name)
            raise emfile()

    sup = Supervision(injector=inject)
    listener = MetricsListener(
        MetricsConfig(listen="127.0.0.1:0"), CollectorRegistry(), supervision=sup
    )
    listener.start()
    try:
        assert eventually(lambda: bool(raised))
        with urllib.request.urlopen(f"http://127.0.0.1:{listener.port}/metrics", timeout=3) as r:
            assert r.status == 200
        assert sup.faults()["metrics"] == 1
        assert eventually(lambda: sup.stalled() == ())
    finally:
        listener.stop()
    assert not any(t.name == "metrics" for t in threading.enumerate())


# --- what the sysadmin sees --------------------------------------------------------------------


def test_status_names_a_stalled_loop_and_the_faults() -> None:
    turning = format_status({**STATUS, "loops": {"stalled": [], "faults": {"verify": 2}}})
    assert "loops:         all turning; faults since start: verify 2" in turning
    stalled = format_status(
        {**STATUS, "loops": {"stalled": ["writer"], "faults": dict.fromkeys(LOOP_DEADLINES, 0)}}
    )
    assert "LOOPS STALLED: writer" in stalled
    assert "faults: none" in stalled


def test_systemd_status_line_names_stalled_loops() -> None:
    line = Status(3, in_sync=True, resync_required=False, shadowed=False, stalled=("verify",))
    assert "STALLED: verify" in line.line()
    assert "STALLED" not in Status(3, True, False, False).line()


def test_doctor_flags_stalled_loops_as_a_problem_and_faults_as_a_warning() -> None:
    quiet = dict.fromkeys(LOOP_DEADLINES, 0)
    assert check_loops({"stalled": [], "faults": quiet}).level is Level.OK
    faulted = check_loops({"stalled": [], "faults": {**quiet, "verify": 3}})
    assert (faulted.level, "verify 3" in faulted.summary) == (Level.WARNING, True)
    stalled = check_loops({"stalled": ["grpc"], "faults": quiet})
    assert (stalled.level, "grpc" in stalled.summary) == (Level.PROBLEM, True)


class BuggyTable:
    """A kernel adapter with a bug: every transaction raises something unexpected."""

    def apply(self, *args: Any, **kwargs: Any) -> None:
        raise KeyError(ADDRESS)


def test_a_bug_while_applying_a_group_answers_the_caller_and_counts_a_writer_fault(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine(store)
    engine.table = cast(FirewallTable, BuggyTable())
    engine.load()
    engine.start()
    try:
        with caplog.at_level(logging.ERROR), pytest.raises(Unavailable) as err:
            engine.submit(allow(1))
        assert err.value.reason == "internal_error"
        assert engine.supervision.faults()["writer"] == 1
        assert alive(engine)
        assert ADDRESS not in caplog.text
    finally:
        engine.stop()
