"""Scrape-time collectors: every value is read fresh when Prometheus asks, none is cached.

Owns the metrics that describe state (entries, sync, counters in the kernel, certificates, the
memory limit, build). Each collector reads only what it was handed (a ``MetricsSource``, a
``CounterSource``, certificate files, the cgroup file system) and never changes anything. A
source that fails makes its collector yield nothing for that scrape, logged, rather than fail
the whole scrape: the other metrics, and the absence of the failed ones, are what an operator
needs then.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cryptography import x509
from prometheus_client import ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.config import AgentConfig, FirewallConfig
from agent.errors import AgentError
from agent.metrics.source import CounterSource, MetricsSource
from agent.rules import render

log = logging.getLogger(__name__)

PREFIX = "vicifast_agent_"
EXPIRING_WINDOW_MS = 3_600_000
FAMILIES = {4: "ipv4", 6: "ipv6"}


def family_label(family: int) -> str:
    return FAMILIES[family]


class StateCollector(Collector):
    """Entries, fill ratio, expiring soon, state version, sync, drift, expiries, shadowing,
    conntrack flows cut."""

    def __init__(
        self,
        source: MetricsSource,
        firewall: FirewallConfig,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.source = source
        self.firewall = firewall  # replaced whole on reload
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        try:
            entries, version = self.source.snapshot()
            status = self.source.metrics_status()
        except (AgentError, OSError):
            log.exception("metrics: the daemon's state could not be read")
            return
        fw = self.firewall
        now_ms = int(self.clock() * 1000)
        per_set: Counter[tuple[str, int]] = Counter()
        expiring = 0
        for e in entries:
            per_set[(e.key.profile, e.key.address.family)] += 1
            if e.expires_at_ms <= now_ms + EXPIRING_WINDOW_MS:
                expiring += 1
        for p in fw.profiles:
            for fam in FAMILIES:
                per_set.setdefault((p.name, fam), 0)
        sizes = {4: fw.set_size_ipv4, 6: fw.set_size_ipv6}

        count = GaugeMetricFamily(
            PREFIX + "entries",
            "Allow entries the kernel enforces, by address family and profile.",
            labels=["family", "profile"],
        )
        fill = GaugeMetricFamily(
            PREFIX + "set_fill_ratio",
            "Elements in each allow set divided by the set's configured size (1 = full).",
            labels=["family", "profile"],
        )
        for (profile, fam), n in sorted(per_set.items()):
            count.add_metric([family_label(fam), profile], n)
            fill.add_metric([family_label(fam), profile], n / sizes[fam])
        yield count
        yield fill
        yield GaugeMetricFamily(
            PREFIX + "entries_expiring_within_hour",
            "Allow entries whose timeout ends within the next hour unless refreshed.",
            value=expiring,
        )
        yield GaugeMetricFamily(
            PREFIX + "state_version",
            "The agent's state version: raised by every change to the allow state.",
            value=version,
        )
        yield GaugeMetricFamily(
            PREFIX + "in_sync",
            "1 when the kernel's table matched the agent's state at the last check, else 0.",
            value=int(status.in_sync),
        )
        yield GaugeMetricFamily(
            PREFIX + "shadowing_detected",
            "1 when another table's base chain on the same hook could drop what the agent "
            "allows, else 0.",
            value=int(status.shadowing),
        )
        yield GaugeMetricFamily(
            PREFIX + "last_verification_timestamp_seconds",
            "Unix time of the last successful verification of the kernel's table (0 = never).",
            value=status.last_verified_at_ms / 1000,
        )
        yield CounterMetricFamily(
            PREFIX + "drift_repairs",
            "Repairs of the agent's table or entries after someone else changed them.",
            value=status.drift_repairs,
        )
        yield GaugeMetricFamily(
            PREFIX + "drift_repair_storm",
            "1 while drift repairs keep coming (30 or more within a minute): something keeps "
            "changing the agent's table back, e.g. a second agent on the same table, else 0.",
            value=int(status.repair_storm),
        )
        yield CounterMetricFamily(
            PREFIX + "expiries",
            "Allow entries that reached the end of their timeout and were removed.",
            value=status.expiries,
        )
        yield CounterMetricFamily(
            PREFIX + "flows_cut",
            "Conntrack flows deleted because their source was revoked (they would otherwise "
            "pass as replies).",
            value=status.flows_cut,
        )
        yield CounterMetricFamily(
            PREFIX + "flow_cut_failures",
            "Flows of revoked sources that could not be cut: a delete refused, a conntrack dump "
            "broken off, or conntrack unavailable (one per revoked address).",
            value=status.flow_cut_failures,
        )


class DropCollector(Collector):
    """Packets and bytes each profile's chain dropped, from the kernel's named counters."""

    def __init__(self, counters: CounterSource, firewall: FirewallConfig) -> None:
        self.counters = counters
        self.firewall = firewall  # replaced whole on reload

    def collect(self) -> Iterator[Metric]:
        try:
            values = self.counters.read()
        except (AgentError, OSError):
            log.exception("metrics: the table's drop counters could not be read")
            return
        packets = CounterMetricFamily(
            PREFIX + "dropped_packets",
            "Packets to a protected port dropped by the agent's table, by profile (kernel "
            "counter; restarts from 0 when the table is rebuilt).",
            labels=["profile"],
        )
        octets = CounterMetricFamily(
            PREFIX + "dropped_bytes",
            "Bytes of the packets counted in vicifast_agent_dropped_packets_total, by profile.",
            labels=["profile"],
        )
        for p in self.firewall.profiles:
            value = values.get(render.drop_counter(p.name))
            if value is None:  # table or counter missing (drift): no sample, not a fake 0
                continue
            packets.add_metric([p.name], value.packets)
            octets.add_metric([p.name], value.bytes)
        yield packets
        yield octets


@dataclass(frozen=True, slots=True)
class CertificateExpiry:
    """Not-after times (Unix seconds) of the certificates in use, by role."""

    not_after: Mapping[str, float]

    @staticmethod
    def of_files(files: Mapping[str, Path]) -> CertificateExpiry:
        """Read each PEM file; the earliest not-after of a bundle counts; unreadable is left
        out (and logged): the listener that uses it has already refused it."""
        out: dict[str, float] = {}
        for role, path in files.items():
            try:
                certs = x509.load_pem_x509_certificates(path.read_bytes())
            except (OSError, ValueError) as exc:
                log.warning("metrics: cannot read the %s certificate %s: %s", role, path, exc)
                continue
            out[role] = min(c.not_valid_after_utc.timestamp() for c in certs)
        return CertificateExpiry(out)

    @staticmethod
    def of_config(cfg: AgentConfig) -> CertificateExpiry:
        files = {"server": cfg.api.server_cert, "client_ca": cfg.api.client_ca}
        if cfg.metrics.tls_cert is not None:
            files["metrics"] = cfg.metrics.tls_cert
        return CertificateExpiry.of_files(files)


class CertificateCollector(Collector):
    """Not-after times of the server certificate, the client CA and the metrics certificate.

    Read at start and on every reload (``update``), the moments the listeners load them, so
    the metric describes what is served rather than what lies on disk.
    """

    def __init__(self, expiry: CertificateExpiry) -> None:
        self.expiry = expiry

    def update(self, expiry: CertificateExpiry) -> None:
        self.expiry = expiry

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            PREFIX + "certificate_not_after_timestamp_seconds",
            "Unix time after which a certificate in use is no longer valid (a bundle: its "
            "earliest).",
            labels=["certificate"],
        )
        for role, when in sorted(self.expiry.not_after.items()):
            family.add_metric([role], when)
        yield family


class BuildInfoCollector(Collector):
    def __init__(self, version: str, python: str, nft: str) -> None:
        self.labels = (version, python, nft)

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            PREFIX + "build_info",
            "Always 1; the labels say which agent, Python and libnftables run.",
            labels=["version", "python", "nft"],
        )
        family.add_metric(list(self.labels), 1)
        yield family


CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


# cgroup v1 writes "no limit" as the largest page-aligned signed 64-bit number.
_V1_UNLIMITED = 1 << 62


def _hierarchy(lines: list[str]) -> tuple[str, str, str] | None:
    """(directory under the cgroup root, limit file, own path): the unified hierarchy (v2) if
    it has a memory controller, else v1's memory hierarchy."""
    for line in lines:
        _, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if "memory" in controllers.split(","):
            return "memory", "memory.limit_in_bytes", path
    unified = next((line[3:] for line in lines if line.startswith("0::")), None)
    return None if unified is None else ("", "memory.max", unified)


def cgroup_memory_limit(
    proc_cgroup: Path = PROC_SELF_CGROUP, root: Path = CGROUP_ROOT
) -> int | None:
    """The memory limit the kernel enforces on this process: the tightest of its cgroup's (the
    unit's ``MemoryMax=``) and every parent's (a slice's), or None when there is none or it
    cannot be read. cgroup v2 (``memory.max``) and v1 (``memory.limit_in_bytes``, hybrid and
    older hosts, some LXC containers) alike."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    found = _hierarchy(lines)
    if found is None:
        return None
    directory, limit_file, own = found
    limits = []
    cgroup = PurePosixPath(own)
    for level in (cgroup, *cgroup.parents):
        try:
            text = (root / directory / str(level).lstrip("/") / limit_file).read_text().strip()
        except OSError:  # the root cgroup has none; a container may hide its parents
            continue
        if text.isdigit() and int(text) < _V1_UNLIMITED:  # v2 says "max" for no limit
            limits.append(int(text))
    return min(limits) if limits else None


class MemoryLimitCollector(Collector):
    """The daemon's memory limit, read at every scrape (a drop-in may raise ``MemoryMax=`` and a
    ``systemctl set-property`` change it without a restart). Together with the process
    collector's ``process_resident_memory_bytes`` it says how close the daemon is to being
    killed; ``process_open_fds``/``process_max_fds`` do the same for ``LimitNOFILE=``."""

    def __init__(self, read: Callable[[], int | None] = cgroup_memory_limit) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            PREFIX + "memory_limit_bytes",
            "The cgroup memory limit the daemon runs under (the unit's MemoryMax=, or a "
            "parent's if tighter); absent when there is none.",
        )
        limit = self.read()
        if limit is not None:
            family.add_metric([], limit)
        yield family


class ProcessFigures(ProcessCollector):
    """prometheus_client's process collector (memory, CPU, descriptors and their limit), with the
    boot time taken from the clock. The library reads it from ``/proc/stat``, which the unit's
    ``ProcSubset=pid`` hides, and then exports nothing at all."""

    def _boot_time(self) -> float:
        return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
