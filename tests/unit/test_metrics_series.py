"""What a scrape of the daemon's registry holds before anything happened, and the process figures.

Every labelled counter exists at 0 for each label value the daemon knows in advance, so the first
event is an increase Prometheus can see; no ``_created`` series; the process collector's memory
and descriptor figures and the cgroup memory limit they are measured against. Each test scrapes
a real ``AgentMetrics`` listener over HTTP on loopback, as Prometheus would.
"""

from __future__ import annotations

import errno
import re
import resource
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from agent.config import LocalConfig, MetricsConfig, parse_config
from agent.devpki import DevMaterial, make_dev_pki
from agent.errors import (
    AgentError,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from agent.local.access import Peer
from agent.local.client import LocalCallError, LocalClient
from agent.local.server import LocalServer
from agent.local.wire import OPS, LocalRequest
from agent.metrics import AgentMetrics, SourceStatus
from agent.metrics.collectors import MemoryLimitCollector, cgroup_memory_limit
from agent.metrics.instruments import AUTH_REASONS, LOCAL_CODES, RequestMetrics, served_rpcs
from agent.rules.nft import FAILURE_REASONS, classify_failure
from agent.rules.readback import CounterValue
from agent.state import Entry

ROOT = Path(__file__).resolve().parents[2]
TOML = """agent_id = "dialer-01"
[firewall]
permit_test_ranges = true
[profiles.agent]
ports = ["5060/udp"]
"""
STATUS = SourceStatus(
    in_sync=True,
    last_verified_at_ms=0,
    drift_repairs=0,
    expiries=0,
    shadowing=False,
    flows_cut=0,
    flow_cut_failures=0,
)
# The RPCs the daemon serves by default; reflection is off unless [api] reflection = true.
DAEMON_RPCS = {"Allow", "Revoke", "Sync", "Erase", "GetState", "WatchEvents"}
HEALTH_RPCS = {"Health.Check", "Health.List", "Health.Watch"}


class EmptySource:
    def snapshot(self) -> tuple[Sequence[Entry], int]:
        return (), 0

    def metrics_status(self) -> SourceStatus:
        return STATUS


class NoCounters:
    def read(self) -> Mapping[str, CounterValue]:
        return {}

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevMaterial:
    return make_dev_pki(tmp_path_factory.mktemp("pki"), "dialer-01")


def started(pki: DevMaterial, *, reflection: bool = False) -> AgentMetrics:
    cfg = parse_config(TOML)
    api = replace(parse_config('agent_id = "a"\n' + pki.config_toml()).api, reflection=reflection)
    cfg = replace(cfg, api=api, metrics=MetricsConfig(listen="127.0.0.1:0"))
    metrics = AgentMetrics(cfg, EmptySource(), NoCounters(), nft_version="1.0.6")
    metrics.start()
    return metrics


@pytest.fixture
def daemon_metrics(pki: DevMaterial) -> Iterator[AgentMetrics]:
    m = started(pki)
    yield m
    m.stop()


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float


def scrape(metrics: AgentMetrics) -> list[Sample]:
    url = f"http://127.0.0.1:{metrics.listener.port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as answer:
        text = answer.read().decode()
    return [
        Sample(s.name, s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def values(samples: list[Sample], name: str, *keys: str) -> dict[tuple[str, ...], float]:
    return {tuple(s.labels[k] for k in keys): s.value for s in samples if s.name == name}


# --- every known label value at 0 from the first scrape --------------------------------------


def test_every_served_rpc_and_status_code_is_at_zero_before_the_first_request(
    daemon_metrics: AgentMetrics,
) -> None:
    requests = values(scrape(daemon_metrics), "vicifast_agent_requests_total", "rpc", "code")

    expected = {(rpc, code.name) for rpc in DAEMON_RPCS | HEALTH_RPCS for code in grpc.StatusCode}
    assert set(requests) == expected
    assert set(requests.values()) == {0}


def test_unary_rpcs_are_timed_from_zero_and_streams_are_not(daemon_metrics: AgentMetrics) -> None:
    counts = values(scrape(daemon_metrics), "vicifast_agent_request_duration_seconds_count", "rpc")

    assert counts == dict.fromkeys(
        [(rpc,) for rpc in ("Allow", "Revoke", "Sync", "Erase", "GetState")]
        + [("Health.Check",), ("Health.List",)],
        0,
    )


def test_reflection_is_counted_when_it_is_served(pki: DevMaterial) -> None:
    metrics = started(pki, reflection=True)
    try:
        rpcs = {rpc for (rpc,) in values(scrape(metrics), "vicifast_agent_requests_total", "rpc")}
    finally:
        metrics.stop()

    assert rpcs == DAEMON_RPCS | HEALTH_RPCS | {"ServerReflection.ServerReflectionInfo"}


def test_every_failure_reason_is_at_zero_before_the_first_failure(
    daemon_metrics: AgentMetrics,
) -> None:
    samples = scrape(daemon_metrics)

    auth = values(samples, "vicifast_agent_auth_failures_total", "reason")
    kernel = values(samples, "vicifast_agent_kernel_transaction_failures_total", "reason")
    assert auth == {(r,): 0 for r in AUTH_REASONS}
    assert kernel == {(r,): 0 for r in ("set_full", "element_conflict", "kernel_refused")}


def test_the_first_kernel_failure_moves_a_series_that_was_already_there(
    daemon_metrics: AgentMetrics,
) -> None:
    before = values(
        scrape(daemon_metrics), "vicifast_agent_kernel_transaction_failures_total", "reason"
    )

    daemon_metrics.kernel.observe(0.01, classify_failure(errno.EPERM, "refused"))

    after = values(
        scrape(daemon_metrics), "vicifast_agent_kernel_transaction_failures_total", "reason"
    )
    assert (before[("kernel_refused",)], after[("kernel_refused",)]) == (0, 1)


def test_no_created_series_are_exported(daemon_metrics: AgentMetrics) -> None:
    daemon_metrics.requests.record("Allow", grpc.StatusCode.OK, None, 0.01)
    daemon_metrics.kernel.observe(0.01, None)

    names = {s.name for s in scrape(daemon_metrics)}

    assert "vicifast_agent_requests_total" in names
    assert {n for n in names if n.endswith("_created")} == set()


# --- the known values are the ones the code can produce ---------------------------------------


def _raised_reasons(kind: str) -> set[str]:
    """The reason words of every ``kind("word", ...)`` raised under agent/."""
    found: set[str] = set()
    for source in (ROOT / "agent").rglob("*.py"):
        found |= set(re.findall(rf'\b{kind}\(\s*"([a-z_]+)"', source.read_text()))
    return found


def test_the_known_auth_reasons_are_every_refusal_the_agent_raises() -> None:
    raised = _raised_reasons("Unauthenticated") | _raised_reasons("PermissionDenied")

    assert raised, "no refusals found under agent/: the pattern no longer matches the code"
    assert raised | {"other"} == set(AUTH_REASONS)


@pytest.mark.parametrize("err", [*sorted(errno.errorcode), 0])
def test_every_errno_is_classified_under_a_known_failure_reason(err: int) -> None:
    assert classify_failure(err, "detail").reason in FAILURE_REASONS


def test_served_rpcs_are_the_agents_services_methods() -> None:
    names = {rpc.name for rpc in served_rpcs(reflection=False)}

    assert names == DAEMON_RPCS | HEALTH_RPCS


# --- local socket requests, counted like remote ones -------------------------------------------


def test_local_requests_are_at_zero_for_every_operation_and_outcome(
    daemon_metrics: AgentMetrics,
) -> None:
    local = values(scrape(daemon_metrics), "vicifast_agent_local_requests_total", "op", "code")

    assert set(local) == {(op, code) for op in (*OPS, "unknown") for code in LOCAL_CODES}
    assert set(local.values()) == {0}
    assert {"OK", "INVALID_ARGUMENT", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED"} <= set(LOCAL_CODES)


@pytest.mark.parametrize(
    ("op", "error", "code"),
    [
        ("allow", None, "OK"),
        ("why", InvalidArgument("bad_request", "x"), "INVALID_ARGUMENT"),
        ("allow", ResourceExhausted("rate_limited", "x"), "RESOURCE_EXHAUSTED"),
        ("status", Unavailable("internal_error", "x"), "UNAVAILABLE"),
        ("no-such-op", InvalidArgument("unknown_op", "x"), "INVALID_ARGUMENT"),
    ],
)
def test_a_local_answer_is_counted_by_operation_and_code(
    daemon_metrics: AgentMetrics, op: str, error: AgentError | None, code: str
) -> None:
    daemon_metrics.requests.record_local(op, error)

    local = values(scrape(daemon_metrics), "vicifast_agent_local_requests_total", "op", "code")
    counted = {k: v for k, v in local.items() if v}
    assert counted == {(op if op in OPS else "unknown", code): 1}


def test_a_refused_local_peer_is_an_auth_failure_by_its_reason(
    daemon_metrics: AgentMetrics,
) -> None:
    daemon_metrics.requests.record_local(
        "unknown", PermissionDenied("local_peer_not_allowed", "uid 1000")
    )

    samples = scrape(daemon_metrics)
    auth = values(samples, "vicifast_agent_auth_failures_total", "reason")
    assert {k: v for k, v in auth.items() if v} == {("local_peer_not_allowed",): 1}
    local = values(samples, "vicifast_agent_local_requests_total", "op", "code")
    assert local[("unknown", "PERMISSION_DENIED")] == 1


def test_the_local_listener_tells_its_observer_every_answer(tmp_path: Path) -> None:
    class Service:
        def handle(self, request: LocalRequest, peer: Peer) -> dict[str, object]:
            if request.op == "why":
                raise InvalidArgument("invalid_address", "as asked")
            return {}

    requests = RequestMetrics(CollectorRegistry(auto_describe=False))
    cfg = LocalConfig(socket=tmp_path / "local.sock")
    server = LocalServer(lambda: cfg, Service(), observe=requests.record_local)  # type: ignore[arg-type]
    server.start()
    try:
        client = LocalClient(cfg.socket)
        client.call("status")
        client.call("list")
        with pytest.raises(LocalCallError):
            client.call("why")
    finally:
        server.stop()

    counted = {
        tuple(s.labels.values()): s.value
        for m in requests.local_requests.collect()
        for s in m.samples
        if s.name.endswith("_total") and s.value
    }
    assert counted == {("status", "OK"): 1, ("list", "OK"): 1, ("why", "INVALID_ARGUMENT"): 1}


# --- the process: memory and descriptors, and the caps they run against ----------------------


def test_the_process_collector_reports_memory_and_descriptors(
    daemon_metrics: AgentMetrics,
) -> None:
    samples = {s.name: s.value for s in scrape(daemon_metrics) if not s.labels}

    assert samples["process_resident_memory_bytes"] > 10 * 2**20  # Python alone is more
    assert 3 <= samples["process_open_fds"] < samples["process_max_fds"]
    assert samples["process_max_fds"] == resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def test_the_scrape_carries_the_memory_limit_of_this_process(
    daemon_metrics: AgentMetrics,
) -> None:
    limit = cgroup_memory_limit()

    samples = values(scrape(daemon_metrics), "vicifast_agent_memory_limit_bytes")

    assert samples == ({} if limit is None else {(): limit})


def cgroup_tree(root: Path, limits: Mapping[str, str], file: str = "memory.max") -> None:
    for path, value in limits.items():
        (root / path).mkdir(parents=True, exist_ok=True)
        (root / path / file).write_text(value + "\n")


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        ({"system.slice/vicifast-agent.service": str(768 * 2**20)}, 768 * 2**20),
        # a drop-in raised the unit's cap, but its slice is tighter: the slice's counts
        (
            {
                "system.slice": str(512 * 2**20),
                "system.slice/vicifast-agent.service": str(2 * 2**30),
            },
            512 * 2**20,
        ),
        ({"system.slice": "max", "system.slice/vicifast-agent.service": "max"}, None),
        ({}, None),  # no memory controller enabled
    ],
    ids=["unit-cap", "slice-tighter", "unlimited", "no-controller"],
)
def test_the_memory_limit_is_the_tightest_of_the_cgroup_and_its_parents(
    tmp_path: Path, limits: Mapping[str, str], expected: int | None
) -> None:
    fs = tmp_path / "cgroup"
    fs.mkdir()
    cgroup_tree(fs, limits)
    own = tmp_path / "self-cgroup"
    own.write_text("0::/system.slice/vicifast-agent.service\n")

    assert cgroup_memory_limit(own, fs) == expected


@pytest.mark.parametrize(
    ("limit", "expected"),
    [(str(768 * 2**20), 768 * 2**20), ("9223372036854771712", None)],
    ids=["unit-cap", "unlimited"],
)
def test_the_memory_limit_under_cgroup_v1(tmp_path: Path, limit: str, expected: int | None) -> None:
    # A hybrid host: the memory controller on v1, the unified hierarchy holding no controller.
    service = "system.slice/vicifast-agent.service"
    cgroup_tree(tmp_path / "memory", {service: limit}, "memory.limit_in_bytes")
    own = tmp_path / "self-cgroup"
    own.write_text(
        "4:memory:/system.slice/vicifast-agent.service\n"
        "1:name=systemd:/system.slice/vicifast-agent.service\n"
        "0::/system.slice/vicifast-agent.service\n"
    )

    assert cgroup_memory_limit(own, tmp_path) == expected


def test_no_memory_limit_without_proc(tmp_path: Path) -> None:
    assert cgroup_memory_limit(tmp_path / "absent", tmp_path) is None


def test_no_memory_limit_is_no_sample_rather_than_zero() -> None:
    (family,) = MemoryLimitCollector(lambda: None).collect()
    (limited,) = MemoryLimitCollector(lambda: 768 * 2**20).collect()

    assert family.samples == []
    assert [s.value for s in limited.samples] == [768 * 2**20]
