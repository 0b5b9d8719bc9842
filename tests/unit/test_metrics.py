"""The daemon's metrics, each collector fed by a stand-in: names, labels and values.

Every collector and instrument of ``agent.metrics`` has a test here; the listener is exercised
over real HTTP and HTTPS on loopback. The real daemon's scrape is in tests/e2e/test_metrics.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import ssl
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import prometheus_client
import pytest
from cryptography import x509
from prometheus_client import CollectorRegistry
from prometheus_client.registry import Collector

from agent import __version__
from agent.config import AgentConfig, MetricsConfig, parse_config
from agent.devpki import DevMaterial, make_dev_pki
from agent.errors import AgentError, ConfigError, KernelError
from agent.metrics import AgentMetrics, SourceStatus
from agent.metrics.collectors import (
    BuildInfoCollector,
    CertificateCollector,
    CertificateExpiry,
    DropCollector,
    StateCollector,
)
from agent.metrics.http import MetricsListener
from agent.metrics.instruments import (
    KernelMetrics,
    RequestInterceptor,
    RequestMetrics,
    reason_word,
    rpc_name,
)
from agent.model import EntryKey
from agent.policy import normalize_address
from agent.rules import nft
from agent.rules.nft import NftAdapter
from agent.rules.readback import CounterValue
from agent.state import Entry

NOW_S = 1_800_000_000.0
NOW_MS = int(NOW_S * 1000)
HOUR_MS = 3_600_000
TOML = """agent_id = "dialer-01"
[firewall]
permit_test_ranges = true
set_size_ipv4 = 100
set_size_ipv6 = 50
[profiles.agent]
ports = ["5060/udp"]
[profiles.admin]
ports = ["22/tcp"]
"""
CFG = parse_config(TOML)


def entry(address: str, profile: str = "agent", expires_in_ms: int = 2 * HOUR_MS) -> Entry:
    key = EntryKey(profile, normalize_address(address, CFG.address_policy))
    return Entry(key, "alice", NOW_MS - 1000, NOW_MS + expires_in_ms, "req-1")


STATUS = SourceStatus(
    in_sync=True,
    last_verified_at_ms=NOW_MS - 5000,
    drift_repairs=0,
    expiries=0,
    shadowing=False,
    flows_cut=0,
    flow_cut_failures=0,
)


@dataclass
class StandInSource:
    entries: Sequence[Entry] = ()
    version: int = 0
    status: SourceStatus = STATUS
    fail: bool = False

    def snapshot(self) -> tuple[Sequence[Entry], int]:
        if self.fail:
            raise AgentError("store_unreadable", "stand-in failure")
        return self.entries, self.version

    def metrics_status(self) -> SourceStatus:
        return self.status


@dataclass
class StandInCounters:
    values: dict[str, CounterValue] = field(default_factory=dict)
    fail: bool = False

    closed: bool = False

    def read(self) -> Mapping[str, CounterValue]:
        if self.fail:
            raise KernelError("counters_unreadable", errno.EPERM)
        return self.values

    def close(self) -> None:
        self.closed = True


def registry_of(*collectors: Collector) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    for c in collectors:
        reg.register(c)
    return reg


def sample(reg: CollectorRegistry, name: str, **labels: str) -> float | None:
    return reg.get_sample_value(name, labels)


def state_registry(source: StandInSource) -> CollectorRegistry:
    return registry_of(StateCollector(source, CFG.firewall, clock=lambda: NOW_S))


# --- StateCollector ---------------------------------------------------------------------------


def test_entries_are_counted_by_family_and_profile_with_zeros_for_empty_sets() -> None:
    source = StandInSource(
        [
            entry("198.18.0.1"),
            entry("198.18.0.2"),
            entry("2001:db8::1"),
            entry("198.18.0.3", "admin"),
        ]
    )
    reg = state_registry(source)

    got = {
        (fam, prof): sample(reg, "vicifast_agent_entries", family=fam, profile=prof)
        for fam in ("ipv4", "ipv6")
        for prof in ("agent", "admin")
    }

    assert got == {
        ("ipv4", "agent"): 2,
        ("ipv6", "agent"): 1,
        ("ipv4", "admin"): 1,
        ("ipv6", "admin"): 0,
    }


def test_fill_ratio_divides_by_each_familys_configured_set_size() -> None:
    source = StandInSource([entry(f"198.18.0.{i}") for i in range(1, 26)] + [entry("2001:db8::1")])
    reg = state_registry(source)

    assert sample(reg, "vicifast_agent_set_fill_ratio", family="ipv4", profile="agent") == 0.25
    assert sample(reg, "vicifast_agent_set_fill_ratio", family="ipv6", profile="agent") == 0.02
    assert sample(reg, "vicifast_agent_set_fill_ratio", family="ipv4", profile="admin") == 0


@pytest.mark.parametrize(
    ("expires_in_ms", "counted"),
    [(1, 1), (HOUR_MS, 1), (HOUR_MS + 1, 0), (24 * HOUR_MS, 0)],
    ids=["now", "exactly-one-hour", "just-after", "a-day"],
)
def test_entries_expiring_within_the_hour(expires_in_ms: int, counted: int) -> None:
    reg = state_registry(StandInSource([entry("198.18.0.1", expires_in_ms=expires_in_ms)]))

    assert sample(reg, "vicifast_agent_entries_expiring_within_hour") == counted


@pytest.mark.parametrize(
    ("status", "name", "value"),
    [
        (STATUS, "vicifast_agent_in_sync", 1),
        (replace(STATUS, in_sync=False), "vicifast_agent_in_sync", 0),
        (STATUS, "vicifast_agent_shadowing_detected", 0),
        (replace(STATUS, shadowing=True), "vicifast_agent_shadowing_detected", 1),
        (STATUS, "vicifast_agent_last_verification_timestamp_seconds", NOW_S - 5),
        (replace(STATUS, drift_repairs=3), "vicifast_agent_drift_repairs_total", 3),
        (replace(STATUS, expiries=41), "vicifast_agent_expiries_total", 41),
        (replace(STATUS, flows_cut=7), "vicifast_agent_flows_cut_total", 7),
        (replace(STATUS, flow_cut_failures=2), "vicifast_agent_flow_cut_failures_total", 2),
        (STATUS, "vicifast_agent_drift_repair_storm", 0),
        (replace(STATUS, repair_storm=True), "vicifast_agent_drift_repair_storm", 1),
    ],
    ids=[
        "in-sync",
        "out-of-sync",
        "no-shadowing",
        "shadowing",
        "verified",
        "drift",
        "expiries",
        "flows-cut",
        "flow-cut-failures",
        "no-repair-storm",
        "repair-storm",
    ],
)
def test_daemon_status_figures(status: SourceStatus, name: str, value: float) -> None:
    reg = state_registry(StandInSource(status=status))

    assert sample(reg, name) == value


@pytest.mark.parametrize(
    "field",
    ["last_verified_at_ms", "drift_repairs", "expiries", "flows_cut", "flow_cut_failures"],
)
def test_a_negative_figure_is_refused_where_the_status_is_made(field: str) -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        replace(STATUS, **{field: -1})


def test_state_version_is_the_snapshots() -> None:
    reg = state_registry(StandInSource(version=1234))

    assert sample(reg, "vicifast_agent_state_version") == 1234


def test_state_is_read_at_scrape_time_not_at_registration() -> None:
    source = StandInSource(version=1)
    reg = state_registry(source)
    source.version = 2
    source.entries = [entry("198.18.0.9")]

    assert sample(reg, "vicifast_agent_state_version") == 2
    assert sample(reg, "vicifast_agent_entries", family="ipv4", profile="agent") == 1


def test_an_unreadable_state_leaves_the_other_metrics_scrapable() -> None:
    reg = registry_of(
        StateCollector(StandInSource(fail=True), CFG.firewall),
        BuildInfoCollector("1", "3", "n"),
    )

    text = prometheus_client.generate_latest(reg).decode()

    assert "vicifast_agent_entries" not in text
    assert "vicifast_agent_build_info" in text


# --- DropCollector ----------------------------------------------------------------------------


def test_dropped_packets_and_bytes_per_profile_come_from_the_named_counters() -> None:
    counters = StandInCounters(
        {
            "drop_agent": CounterValue("drop_agent", 7, 420),
            "drop_admin": CounterValue("drop_admin", 1, 60),
        }
    )
    reg = registry_of(DropCollector(counters, CFG.firewall))

    assert sample(reg, "vicifast_agent_dropped_packets_total", profile="agent") == 7
    assert sample(reg, "vicifast_agent_dropped_bytes_total", profile="agent") == 420
    assert sample(reg, "vicifast_agent_dropped_packets_total", profile="admin") == 1
    assert sample(reg, "vicifast_agent_dropped_bytes_total", profile="admin") == 60


def test_drop_counters_are_read_at_every_scrape() -> None:
    counters = StandInCounters({"drop_agent": CounterValue("drop_agent", 1, 10)})
    reg = registry_of(DropCollector(counters, CFG.firewall))
    assert sample(reg, "vicifast_agent_dropped_packets_total", profile="agent") == 1

    counters.values = {"drop_agent": CounterValue("drop_agent", 5, 50)}

    assert sample(reg, "vicifast_agent_dropped_packets_total", profile="agent") == 5


@pytest.mark.parametrize(
    "counters",
    [StandInCounters({"drop_other": CounterValue("drop_other", 9, 9)}), StandInCounters(fail=True)],
    ids=["counter-missing", "read-fails"],
)
def test_a_missing_drop_counter_has_no_sample_rather_than_zero(counters: StandInCounters) -> None:
    reg = registry_of(DropCollector(counters, CFG.firewall))

    assert sample(reg, "vicifast_agent_dropped_packets_total", profile="agent") is None


# --- CertificateCollector ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevMaterial:
    return make_dev_pki(tmp_path_factory.mktemp("pki"), "dialer-01")


def not_after(path: Path) -> float:
    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc.timestamp()


def test_certificate_not_after_times_by_role(pki: DevMaterial) -> None:
    early = pki.issue_server_cert("early", not_after=dt.datetime.now(dt.UTC) + dt.timedelta(days=2))
    bundle = pki.directory / "bundle.pem"
    bundle.write_bytes(pki.ca_cert.read_bytes() + early.cert.read_bytes())
    expiry = CertificateExpiry.of_files({"server": pki.server.cert, "client_ca": bundle})
    reg = registry_of(CertificateCollector(expiry))

    name = "vicifast_agent_certificate_not_after_timestamp_seconds"
    assert sample(reg, name, certificate="server") == not_after(pki.server.cert)
    # A bundle is as good as its first certificate to expire.
    assert sample(reg, name, certificate="client_ca") == not_after(early.cert)


def test_certificates_come_from_the_configuration(pki: DevMaterial) -> None:
    cfg = parse_config(
        'agent_id = "dialer-01"\n'
        + pki.config_toml()
        + f'[metrics]\ntls_cert = "{pki.server.cert}"\ntls_key = "{pki.server.key}"\n'
    )

    expiry = CertificateExpiry.of_config(cfg)

    assert expiry.not_after == {
        "server": not_after(pki.server.cert),
        "client_ca": not_after(pki.ca_cert),
        "metrics": not_after(pki.server.cert),
    }


def test_an_unreadable_certificate_is_left_out(pki: DevMaterial, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    expiry = CertificateExpiry.of_files(
        {"server": tmp_path / "absent.pem", "client_ca": garbage, "metrics": pki.ca_cert}
    )

    assert set(expiry.not_after) == {"metrics"}


def test_certificate_update_replaces_what_is_reported(pki: DevMaterial) -> None:
    collector = CertificateCollector(CertificateExpiry({"server": 1.0}))
    reg = registry_of(collector)

    collector.update(CertificateExpiry({"server": 2.0}))

    name = "vicifast_agent_certificate_not_after_timestamp_seconds"
    assert sample(reg, name, certificate="server") == 2.0


# --- BuildInfoCollector -----------------------------------------------------------------------


def test_build_info_is_one_with_the_versions_as_labels() -> None:
    reg = registry_of(BuildInfoCollector("0.1.0", "3.11.2", "1.0.6"))

    assert (
        sample(reg, "vicifast_agent_build_info", version="0.1.0", python="3.11.2", nft="1.0.6") == 1
    )


# --- requests (interceptor) -------------------------------------------------------------------


class StandInContext:
    """The part of ``grpc.aio.ServicerContext`` the interceptor reads, with an abort that
    raises as grpc's does."""

    def __init__(self) -> None:
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None
        self.written: list[Any] = []

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details
        raise grpc.aio.AbortError()

    async def write(self, message: Any) -> None:
        self.written.append(message)

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str | None:
        return self._details


@dataclass(frozen=True)
class CallDetails:
    method: str
    invocation_metadata: tuple[tuple[str, str], ...] = ()


class Clock:
    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


async def ok(request: Any, context: StandInContext) -> str:
    return "answer"


def refuse(code: grpc.StatusCode, details: str) -> Callable[[Any, StandInContext], Any]:
    async def behaviour(request: Any, context: StandInContext) -> str:
        await context.abort(code, details)
        return "unreachable"

    return behaviour


async def crash(request: Any, context: StandInContext) -> str:
    raise RuntimeError("bug")


AGENT = "/vicifast.agent.v1.FirewallAgent/"


def intercepted(
    behaviour: Callable[[Any, Any], Any], method: str, *, stream: bool = False
) -> tuple[Callable[[Any, Any], Any], CollectorRegistry]:
    reg = CollectorRegistry(auto_describe=False)
    interceptor = RequestInterceptor(RequestMetrics(reg), clock=Clock(0.25))
    make = grpc.unary_stream_rpc_method_handler if stream else grpc.unary_unary_rpc_method_handler

    async def continuation(details: Any) -> Any:
        return make(behaviour)

    handler = asyncio.run(interceptor.intercept_service(continuation, CallDetails(method)))
    wrapped = handler.unary_stream if stream else handler.unary_unary
    return wrapped, reg


def answer(call: Callable[[Any, Any], Any], context: StandInContext | None = None) -> Any:
    return asyncio.run(call("request", context or StandInContext()))


@pytest.mark.parametrize(
    ("behaviour", "code"),
    [
        (ok, "OK"),
        (refuse(grpc.StatusCode.INVALID_ARGUMENT, "bad_address: x"), "INVALID_ARGUMENT"),
        (crash, "UNKNOWN"),
    ],
    ids=["answered", "refused", "crashed"],
)
def test_requests_are_counted_by_rpc_and_code_and_timed(
    behaviour: Callable[[Any, Any], Any], code: str
) -> None:
    call, reg = intercepted(behaviour, AGENT + "Allow")

    with contextlib.suppress(Exception):  # the behaviour's own exception passes through
        answer(call)

    assert sample(reg, "vicifast_agent_requests_total", rpc="Allow", code=code) == 1
    assert sample(reg, "vicifast_agent_request_duration_seconds_count", rpc="Allow") == 1
    assert sample(reg, "vicifast_agent_request_duration_seconds_sum", rpc="Allow") == 0.25


def test_the_interceptor_passes_answers_and_errors_through_untouched() -> None:
    answered, _ = intercepted(ok, AGENT + "GetState")
    crashed, _ = intercepted(crash, AGENT + "GetState")

    assert answer(answered) == "answer"
    with pytest.raises(RuntimeError):
        answer(crashed)


@pytest.mark.parametrize(
    ("code", "details", "reason"),
    [
        (grpc.StatusCode.PERMISSION_DENIED, "caller_not_allowed: identity x", "caller_not_allowed"),
        (grpc.StatusCode.UNAUTHENTICATED, "bad_signature: no key verified", "bad_signature"),
        (grpc.StatusCode.UNAUTHENTICATED, "no_client_certificate", "no_client_certificate"),
        (grpc.StatusCode.UNAUTHENTICATED, "Free Text from elsewhere", "other"),
    ],
    ids=["permission", "signature", "bare-word", "not-a-reason-word"],
)
def test_auth_failures_are_counted_by_reason_word(
    code: grpc.StatusCode, details: str, reason: str
) -> None:
    call, reg = intercepted(refuse(code, details), AGENT + "Revoke")

    with pytest.raises(grpc.aio.AbortError):
        answer(call)

    assert sample(reg, "vicifast_agent_auth_failures_total", reason=reason) == 1


def test_a_refusal_is_counted_before_its_status_is_sent() -> None:
    """grpc's asyncio ``abort`` sends the status at once: a caller that saw the refusal and
    then scrapes must find it counted."""
    call, reg = intercepted(
        refuse(grpc.StatusCode.UNAUTHENTICATED, "unknown_key: k"), AGENT + "Allow"
    )
    counted_when_sent: list[float | None] = []

    class Sending(StandInContext):
        async def abort(self, code: grpc.StatusCode, details: str) -> None:
            counted_when_sent.append(
                sample(reg, "vicifast_agent_requests_total", rpc="Allow", code=code.name)
            )
            await super().abort(code, details)

    with pytest.raises(grpc.aio.AbortError):
        answer(call, Sending())

    assert counted_when_sent == [1]
    assert sample(reg, "vicifast_agent_requests_total", rpc="Allow", code="UNAUTHENTICATED") == 1
    assert sample(reg, "vicifast_agent_auth_failures_total", reason="unknown_key") == 1


def test_other_refusals_are_not_auth_failures() -> None:
    call, reg = intercepted(refuse(grpc.StatusCode.FAILED_PRECONDITION, "stale: x"), AGENT + "Sync")

    with pytest.raises(grpc.aio.AbortError):
        answer(call)

    failures = [
        s
        for m in reg.collect()
        if m.name == "vicifast_agent_auth_failures"
        for s in m.samples
        if s.name.endswith("_total")
    ]
    assert failures, "every known reason is exported at 0"
    assert {s.value for s in failures} == {0}


async def events(request: Any, context: StandInContext) -> AsyncIterator[int]:
    for n in (1, 2, 3):
        yield n


def test_a_stream_is_counted_when_it_ends_and_not_timed() -> None:
    call, reg = intercepted(events, AGENT + "WatchEvents", stream=True)

    async def consume() -> list[int]:
        stream = call("request", StandInContext())
        first = [await anext(stream)]
        # Not yet ended: not yet counted.
        assert sample(reg, "vicifast_agent_requests_total", rpc="WatchEvents", code="OK") == 0
        return first + [n async for n in stream]

    assert asyncio.run(consume()) == [1, 2, 3]

    assert sample(reg, "vicifast_agent_requests_total", rpc="WatchEvents", code="OK") == 1
    assert sample(reg, "vicifast_agent_request_duration_seconds_count", rpc="WatchEvents") is None


def test_a_stream_the_client_left_is_counted_as_cancelled() -> None:
    call, reg = intercepted(events, AGENT + "WatchEvents", stream=True)

    async def leave_after_one() -> None:
        stream = call("request", StandInContext())
        await anext(stream)
        await stream.aclose()

    asyncio.run(leave_after_one())

    assert sample(reg, "vicifast_agent_requests_total", rpc="WatchEvents", code="CANCELLED") == 1


def test_a_stream_written_through_the_context_keeps_its_kind_and_is_counted() -> None:
    async def watch(request: Any, context: StandInContext) -> None:
        await context.write("SERVING")  # how grpc's asyncio health service streams

    call, reg = intercepted(watch, "/grpc.health.v1.Health/Watch", stream=True)
    context = StandInContext()

    assert answer(call, context) is None

    assert context.written == ["SERVING"]
    assert sample(reg, "vicifast_agent_requests_total", rpc="Health.Watch", code="OK") == 1


def test_unknown_methods_are_left_to_grpc_and_not_counted() -> None:
    reg = CollectorRegistry(auto_describe=False)
    interceptor = RequestInterceptor(RequestMetrics(reg))

    async def continuation(details: Any) -> None:
        return None

    assert asyncio.run(interceptor.intercept_service(continuation, CallDetails("/x.Y/Z"))) is None


@pytest.mark.parametrize(
    ("method", "name"),
    [
        (AGENT + "Allow", "Allow"),
        ("/grpc.health.v1.Health/Check", "Health.Check"),
        (
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            "ServerReflection.ServerReflectionInfo",
        ),
    ],
    ids=["agent", "health", "reflection"],
)
def test_rpc_label_names(method: str, name: str) -> None:
    assert rpc_name(method) == name


@pytest.mark.parametrize(
    ("details", "word"),
    [
        (b"caller_not_allowed: identity x", "caller_not_allowed"),
        ("expired", "expired"),
        ("", "other"),
        (None, "other"),
        ("UPPER: x", "other"),
        ("a" * 65, "other"),
    ],
    ids=["bytes", "bare", "empty", "none", "not-snake-case", "too-long"],
)
def test_reason_word(details: str | bytes | None, word: str) -> None:
    assert reason_word(details) == word


# --- kernel transactions (NftAdapter observer) ------------------------------------------------


class StandInNft:
    """A libnftables context whose next ``cmd`` fails with ``fail_errno`` (0 = succeeds)."""

    fail_errno = 0

    def cmd(self, cmdline: str | bytes) -> tuple[int, str, str]:
        if self.fail_errno:
            nft._errno_location()[0] = self.fail_errno
            return 1, "", "Error: stand-in"
        return 0, "", ""

    def set_json_output(self, val: bool) -> bool:
        return True

    def set_terse_output(self, val: bool) -> bool:
        return True


@pytest.mark.parametrize(
    ("fail_errno", "reason"),
    [
        (errno.ENFILE, "set_full"),
        (errno.EEXIST, "element_conflict"),
        (errno.EPERM, "kernel_refused"),
    ],
)
def test_kernel_transaction_failures_are_counted_by_reason(fail_errno: int, reason: str) -> None:
    reg = CollectorRegistry(auto_describe=False)
    kernel = KernelMetrics(reg)
    ctx = StandInNft()
    adapter = NftAdapter(lambda: ctx, observe=kernel.observe)
    adapter.apply("{}")
    ctx.fail_errno = fail_errno

    with pytest.raises(AgentError):
        adapter.apply("{}")

    assert sample(reg, "vicifast_agent_kernel_transaction_failures_total", reason=reason) == 1
    assert sample(reg, "vicifast_agent_kernel_transaction_duration_seconds_count") == 2


def test_kernel_transaction_duration_is_observed() -> None:
    reg = CollectorRegistry(auto_describe=False)
    kernel = KernelMetrics(reg)

    kernel.observe(0.003, None)

    assert sample(reg, "vicifast_agent_kernel_transaction_duration_seconds_count") == 1
    assert sample(reg, "vicifast_agent_kernel_transaction_duration_seconds_sum") == 0.003
    assert sample(reg, "vicifast_agent_kernel_transaction_duration_seconds_bucket", le="0.005") == 1


# --- configuration ------------------------------------------------------------------------------


def test_metrics_tls_is_off_by_default() -> None:
    assert (CFG.metrics.tls_cert, CFG.metrics.tls_key) == (None, None)


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ('tls_cert = "/etc/m.crt"\n', "metrics.tls_key"),
        ('tls_key = "/etc/m.key"\n', "metrics.tls_cert"),
        ("tls_cert = 1\n", "metrics.tls_cert"),
        ('tls_cert = "/a"\ntls_key = true\n', "metrics.tls_key"),
    ],
    ids=["cert-without-key", "key-without-cert", "cert-not-a-path", "key-not-a-path"],
)
def test_metrics_tls_keys_are_validated(body: str, key: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config('agent_id = "a"\n[metrics]\n' + body)

    assert refused.value.key == key


def test_metrics_tls_paths_are_read() -> None:
    cfg = parse_config('agent_id = "a"\n[metrics]\ntls_cert = "/c.pem"\ntls_key = "/k.pem"\n')

    assert (cfg.metrics.tls_cert, cfg.metrics.tls_key) == (Path("/c.pem"), Path("/k.pem"))


# --- the registry and the listener --------------------------------------------------------------

LOOPBACK_ANY_PORT = "127.0.0.1:0"


def agent_metrics(cfg: AgentConfig, source: StandInSource | None = None) -> AgentMetrics:
    return AgentMetrics(
        cfg,
        source or StandInSource([entry("198.18.0.1")], version=3),
        StandInCounters({"drop_agent": CounterValue("drop_agent", 2, 80)}),
        nft_version="1.0.6",
    )


@pytest.fixture
def plain(pki: DevMaterial) -> Iterator[AgentMetrics]:
    cfg = replace(CFG, metrics=MetricsConfig(listen=LOOPBACK_ANY_PORT))
    cfg = replace(cfg, api=parse_config('agent_id = "a"\n' + pki.config_toml()).api)
    m = agent_metrics(cfg)
    m.start()
    yield m
    m.stop()


def fetch(url: str, context: ssl.SSLContext | None = None) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=10, context=context) as answer:  # noqa: S310
        return answer.status, answer.headers["Content-Type"], answer.read().decode()


def test_the_registry_is_the_daemons_own(plain: AgentMetrics) -> None:
    global_names = {m.name for m in prometheus_client.REGISTRY.collect()}

    assert not {n for n in global_names if n.startswith("vicifast")}
    assert plain.registry is not prometheus_client.REGISTRY


def test_the_listener_serves_the_registry_over_http(plain: AgentMetrics) -> None:
    plain.kernel.observe(0.01, None)

    status, ctype, text = fetch(f"http://127.0.0.1:{plain.listener.port}/metrics")

    assert status == 200
    assert ctype.startswith("text/plain")
    assert 'vicifast_agent_entries{family="ipv4",profile="agent"} 1.0' in text
    assert 'vicifast_agent_dropped_packets_total{profile="agent"} 2.0' in text
    assert "vicifast_agent_kernel_transaction_duration_seconds_count 1.0" in text
    assert f'version="{__version__}"' in text


def test_a_busy_port_is_a_config_error_naming_the_key(plain: AgentMetrics) -> None:
    taken = MetricsConfig(listen=f"127.0.0.1:{plain.listener.port}")

    with pytest.raises(ConfigError) as refused:
        MetricsListener(taken, CollectorRegistry())

    assert refused.value.key == "metrics.listen"


def tls_config(cert: Path, key: Path) -> MetricsConfig:
    return MetricsConfig(listen=LOOPBACK_ANY_PORT, tls_cert=cert, tls_key=key)


def client_context(pki: DevMaterial) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki.ca_cert)
    ctx.check_hostname = False  # the dev server certificate names 127.0.0.1 but not "localhost"
    return ctx


def served_certificate(port: int, pki: DevMaterial) -> x509.Certificate:
    import socket  # noqa: PLC0415

    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        client_context(pki).wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_the_listener_serves_https_and_reload_swaps_the_certificate(pki: DevMaterial) -> None:
    listener = MetricsListener(
        tls_config(pki.server.cert, pki.server.key), CollectorRegistry(auto_describe=False)
    )
    listener.start()
    try:
        status, _, _ = fetch(f"https://127.0.0.1:{listener.port}/metrics", client_context(pki))
        assert status == 200
        renewed = pki.issue_server_cert("renewed")

        listener.reload(tls_config(renewed.cert, renewed.key))

        served = served_certificate(listener.port, pki)
        assert served == x509.load_pem_x509_certificate(renewed.cert.read_bytes())
    finally:
        listener.stop()


@pytest.mark.parametrize(
    ("which", "key"),
    [("cert", "metrics.tls_cert"), ("key", "metrics.tls_key"), ("mismatch", "metrics.tls_cert")],
)
def test_unusable_tls_material_is_a_config_error_naming_the_key(
    pki: DevMaterial, tmp_path: Path, which: str, key: str
) -> None:
    cert, private = pki.server.cert, pki.server.key
    if which == "cert":
        cert = tmp_path / "absent.crt"
    elif which == "key":
        private = tmp_path / "absent.key"
    else:
        private = pki.client.key

    with pytest.raises(ConfigError) as refused:
        MetricsListener(tls_config(cert, private), CollectorRegistry())

    assert refused.value.key == key


def test_a_refused_reload_keeps_serving_the_old_certificate(
    pki: DevMaterial, tmp_path: Path
) -> None:
    listener = MetricsListener(
        tls_config(pki.server.cert, pki.server.key), CollectorRegistry(auto_describe=False)
    )
    listener.start()
    try:
        with pytest.raises(ConfigError):
            listener.reload(tls_config(tmp_path / "absent.crt", pki.server.key))

        served = served_certificate(listener.port, pki)
        assert served == x509.load_pem_x509_certificate(pki.server.cert.read_bytes())
    finally:
        listener.stop()


def test_promtool_finds_nothing_to_lint_in_a_full_exposition(
    promtool: str, plain: AgentMetrics
) -> None:
    plain.kernel.observe(0.01, KernelError("kernel_refused", errno.EPERM))
    plain.requests.record("Allow", grpc.StatusCode.PERMISSION_DENIED, "caller_not_allowed", 0.1)
    plain.requests.record("WatchEvents", grpc.StatusCode.OK, None, None)
    _, _, text = fetch(f"http://127.0.0.1:{plain.listener.port}/metrics")

    lint = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )

    assert (lint.returncode, lint.stdout + lint.stderr) == (0, "")
