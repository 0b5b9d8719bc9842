"""The agent's configuration: one TOML file, fully validated at load into frozen values.

Every check happens here, at start and on reload; an error names the key, the bad value and what
would be accepted. Nothing downstream re-validates configuration or reads the file again.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from agent.errors import ConfigError
from agent.policy import AddressPolicy, TtlBounds

DEFAULT_CONFIG_PATH = Path("/etc/vicifast-agent/agent.toml")
PROTOCOLS = ("tcp", "udp")
_NAME = re.compile(r"[a-z][a-z0-9_]{0,15}")
_AGENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# ASCII digits only: str.isdigit() also accepts superscripts and other scripts' digits.
_PORT_RANGE = re.compile(r"(?P<first>[0-9]{1,5})(?:-(?P<last>[0-9]{1,5}))?/(?P<proto>tcp|udp)")
_HOST_PORT = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(?P<port>[0-9]{1,5})")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# RULESET.md's default profile: SIP, SIP-TLS, HTTPS, Asterisk WebRTC WS/WSS, IAX2. RTP and
# HTTP 80 are deliberately not gated (carrier media, ACME HTTP-01 renewals).
DEFAULT_AGENT_PORTS = (
    "5060/udp",
    "5060/tcp",
    "5061/tcp",
    "443/tcp",
    "8088-8089/tcp",
    "4569/udp",
)


@dataclass(frozen=True, slots=True, order=True)
class PortRange:
    protocol: str
    first: int
    last: int

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS or not 1 <= self.first <= self.last <= 65535:
            raise ValueError(f"bad port range {self}")

    def __str__(self) -> str:
        ports = str(self.first) if self.first == self.last else f"{self.first}-{self.last}"
        return f"{ports}/{self.protocol}"

    def overlaps(self, other: PortRange) -> bool:
        return (
            self.protocol == other.protocol
            and self.first <= other.last
            and other.first <= self.last
        )

    def contains(self, protocol: str, port: int) -> bool:
        return self.protocol == protocol and self.first <= port <= self.last


@dataclass(frozen=True, slots=True)
class Profile:
    """A named group of protected ports and the static sources always admitted to them."""

    name: str
    ports: tuple[PortRange, ...]
    static_sources: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True, slots=True)
class GuardedPort:
    """A port of the agent's own (gRPC, metrics) open only to the given sources."""

    name: str
    port: int
    sources: tuple[IPNetwork, ...]


@dataclass(frozen=True, slots=True)
class FirewallConfig:
    """Everything the ruleset renderer needs; nothing else."""

    table: str = "vicifast"
    chain_priority: int = -10
    set_size_ipv4: int = 65536
    set_size_ipv6: int = 65536
    log_drops: bool = True
    log_rate_per_minute: int = 30
    ipv6_prefix: int = 64
    profiles: tuple[Profile, ...] = ()
    guarded_ports: tuple[GuardedPort, ...] = ()

    def profile(self, name: str) -> Profile:
        for p in self.profiles:
            if p.name == name:
                return p
        raise KeyError(name)


@dataclass(frozen=True, slots=True)
class ApiConfig:
    listen: str = "[::]:7443"
    port: int = 7443
    server_cert: Path = Path("/etc/vicifast-agent/tls/server.crt")
    server_key: Path = Path("/etc/vicifast-agent/tls/server.key")
    client_ca: Path = Path("/etc/vicifast-agent/tls/client-ca.crt")
    allowed_identities: tuple[str, ...] = ()
    control_plane_sources: tuple[IPNetwork, ...] = ()
    reflection: bool = False
    max_message_bytes: int = 32 * 1024 * 1024
    max_concurrent_rpcs: int = 256
    # WatchEvents (and health Watch) streams: their own cap, on top of max_concurrent_rpcs, so
    # watchers never take the capacity of Allow/Revoke/Sync/Erase/GetState (PROTOCOL.md).
    max_watchers: int = 64
    # A watcher whose writes are blocked (it does not read) while more than this many events
    # wait for it gets RESYNC_REQUIRED and the end of its stream once it reads again ...
    watch_buffer_events: int = 1000
    # ... and a write blocked this long ends the stream at once (RESOURCE_EXHAUSTED
    # watcher_stalled): a watcher that never reads holds its slot no longer than this.
    watch_stall_timeout_s: int = 60
    # Connections to the API port (agent.rpc.gate): in total and per source (an IPv4 address
    # or an IPv6 /64); over a cap a connection is reset at once. LimitNOFILE in the unit is
    # sized from max_connections (three descriptors each).
    max_connections: int = 1024
    max_connections_per_source: int = 64
    # A connection must finish its TLS handshake (client certificate included) within this.
    handshake_timeout_s: int = 5
    # An authenticated connection with no call for this long is closed (the client reconnects
    # when it needs to); every connection is closed after max_connection_age_s, calls in
    # flight getting 30 s more; an unanswered keepalive ping closes it after keepalive_s + 20 s.
    max_connection_idle_s: int = 300
    max_connection_age_s: int = 3600
    keepalive_s: int = 60


@dataclass(frozen=True, slots=True)
class SigningConfig:
    """Trusted Ed25519 keys by key id (raw 32-byte public key, base64), plus time tolerances."""

    trusted_keys: tuple[tuple[str, str], ...] = ()
    clock_skew_s: int = 30
    max_window_s: int = 300


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    # See MEMORY in the README's "Known misses" and the unit's MemoryMax: the largest request
    # these admit, replacing a full table, must peak at or below 75% of MemoryMax=768M.
    max_entries_per_request: int = 65_536
    max_entries: int = 65_536


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: str = "127.0.0.1:9617"
    port: int = 9617
    scrape_sources: tuple[IPNetwork, ...] = ()
    # HTTPS when both are set (PEM certificate chain and its private key); plain HTTP when
    # neither is.
    tls_cert: Path | None = None
    tls_key: Path | None = None


@dataclass(frozen=True, slots=True)
class StateConfig:
    directory: Path = Path("/var/lib/vicifast-agent")
    audit_retention_days: int = 7


@dataclass(frozen=True, slots=True)
class LocalConfig:
    """The on-host Unix socket (PROTOCOL.md "Local socket") and its local policy."""

    enabled: bool = True
    socket: Path = Path("/run/vicifast-agent/local.sock")
    group: str = ""  # besides root; empty = root only
    ttl_cap_s: int = 3600
    rate_limit_per_minute: int = 30
    rate_limit_burst: int = 10


@dataclass(frozen=True, slots=True)
class VerifyConfig:
    """How often the running daemon checks its table against its state (drift backstop).

    Changes made by others are noticed at once through nf_tables notifications; these are the
    periodic backstops: a cheap structure check, and a rarer comparison of every element.
    """

    interval_s: int = 30
    elements_interval_s: int = 3600


@dataclass(frozen=True, slots=True)
class AgentConfig:
    agent_id: str
    firewall: FirewallConfig
    address_policy: AddressPolicy
    ttl: TtlBounds
    default_profile: str
    api: ApiConfig = field(default_factory=ApiConfig)
    signing: SigningConfig = field(default_factory=SigningConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    state: StateConfig = field(default_factory=StateConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    source: Path | None = None

    @property
    def profile_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.firewall.profiles)


# ---------------------------------------------------------------------------------------------
# Reading: a tiny typed walker over the parsed TOML that knows the dotted key of every value.

T = TypeVar("T")


class _Section:
    """A TOML table plus its dotted path; tracks which keys were read to refuse unknown ones."""

    def __init__(self, data: Mapping[str, Any], path: str) -> None:
        self._data = data
        self._path = path
        self._seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path else name

    def get(self, name: str, kind: type[T], default: T, accepted: str) -> T:
        self._seen.add(name)
        if name not in self._data:
            return default
        value = self._data[name]
        # bool is an int in Python; a TOML `true` where a number is expected is a mistake.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(self.key(name), f"got {value!r}; expected {accepted}")
        return value

    def int_in(self, name: str, default: int, lo: int, hi: int) -> int:
        value = self.get(name, int, default, f"an integer from {lo} to {hi}")
        if not lo <= value <= hi:
            raise ConfigError(self.key(name), f"got {value}; expected an integer from {lo} to {hi}")
        return value

    def strings(self, name: str, accepted: str) -> list[str]:
        values = self.get(name, list, [], f"a list of strings ({accepted})")
        for v in values:
            if not isinstance(v, str):
                raise ConfigError(self.key(name), f"got {v!r}; expected a string ({accepted})")
        return values

    def section(self, name: str) -> _Section:
        return _Section(self.get(name, dict, {}, "a table"), self.key(name))

    def items(self) -> Iterator[tuple[str, Any]]:
        yield from self._data.items()

    def finish(self) -> None:
        unknown = sorted(set(self._data) - self._seen)
        if unknown:
            raise ConfigError(self.key(unknown[0]), "unknown key (check the spelling)")


def _parse_list(
    sec: _Section, name: str, parse: Callable[[str], T], accepted: str
) -> tuple[T, ...]:
    out: list[T] = []
    for text in sec.strings(name, accepted):
        try:
            out.append(parse(text))
        except ValueError as exc:
            raise ConfigError(sec.key(name), f"got {text!r}; expected {accepted}") from exc
    return tuple(out)


def _parse_port_range(text: str) -> PortRange:
    m = _PORT_RANGE.fullmatch(text)
    if not m:
        raise ValueError(text)
    first = int(m["first"])
    return PortRange(m["proto"], first, int(m["last"]) if m["last"] else first)


def _parse_network(text: str) -> IPNetwork:
    # strict: "198.51.100.7/24" is a typo for a host or a network; refuse rather than guess.
    if text != text.strip():
        raise ValueError(text)
    return ipaddress.ip_network(text, strict=True)


_NETWORKS = "CIDRs such as '203.0.113.0/24' or '2001:db8::/48' with no host bits set"
_PORTS = "strings like '5060/udp' or '8088-8089/tcp'"


def _parse_listen(sec: _Section, name: str, default: str) -> tuple[str, int]:
    text = sec.get(name, str, default, "'HOST:PORT', e.g. '[::]:7443' or '127.0.0.1:9617'")
    m = _HOST_PORT.fullmatch(text)
    if not m or not 1 <= int(m["port"]) <= 65535:
        raise ConfigError(sec.key(name), f"got {text!r}; expected 'HOST:PORT' with a port 1-65535")
    return text, int(m["port"])


def _profiles(root: _Section) -> tuple[tuple[Profile, ...], str]:
    prof_sec = root.section("profiles")
    static_sec = root.section("static_sources")
    raw: dict[str, tuple[PortRange, ...]] = {}
    for name, _ in list(prof_sec.items()):
        if not _NAME.fullmatch(name):
            raise ConfigError(
                prof_sec.key(name), "profile names are 1-16 of [a-z0-9_], starting with a letter"
            )
        sec = prof_sec.section(name)
        ports = _parse_port_range_list(sec)
        sec.finish()
        raw[name] = ports
    prof_sec.finish()
    if not raw:
        raw["agent"] = tuple(_parse_port_range(p) for p in DEFAULT_AGENT_PORTS)
    everywhere = _parse_list(static_sec, "all", _parse_network, _NETWORKS)
    profiles = []
    for name, ports in raw.items():
        own = _parse_list(static_sec, name, _parse_network, _NETWORKS)
        profiles.append(Profile(name, ports, everywhere + own))
    static_sec.finish()
    _refuse_shared_ports(profiles)
    default = root.get(
        "default_profile",
        str,
        "agent" if "agent" in raw else next(iter(raw)),
        f"one of the profiles ({', '.join(raw)})",
    )
    if default not in raw:
        raise ConfigError(
            root.key("default_profile"),
            f"got {default!r}; expected one of the profiles ({', '.join(raw)})",
        )
    return tuple(profiles), default


def _parse_port_range_list(sec: _Section) -> tuple[PortRange, ...]:
    ports = _parse_list(sec, "ports", _parse_port_range, _PORTS)
    if not ports:
        raise ConfigError(sec.key("ports"), f"a profile needs at least one port ({_PORTS})")
    return ports


def _refuse_shared_ports(profiles: list[Profile]) -> None:
    # A protected port belongs to one profile: a packet's verdict must not depend on rule order.
    for i, a in enumerate(profiles):
        for b in profiles[i + 1 :]:
            for pa in a.ports:
                for pb in b.ports:
                    if pa.overlaps(pb):
                        raise ConfigError(
                            f"profiles.{b.name}.ports",
                            f"{pb} overlaps {pa} of profile {a.name!r}; a port may belong to "
                            "one profile only",
                        )


def _firewall(root: _Section, profiles: tuple[Profile, ...]) -> tuple[FirewallConfig, bool]:
    fw = root.section("firewall")
    table = fw.get("table", str, "vicifast", "a table name of [a-z0-9_], e.g. 'vicifast'")
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", table):
        raise ConfigError(fw.key("table"), f"got {table!r}; expected 1-32 of [a-z0-9_]")
    ipv6_prefix = fw.get("ipv6_prefix", int, 64, "64 or 128")
    if ipv6_prefix not in (64, 128):
        raise ConfigError(fw.key("ipv6_prefix"), f"got {ipv6_prefix}; expected 64 or 128")
    permit_test = fw.get("permit_test_ranges", bool, False, "true or false")
    firewall = FirewallConfig(
        table=table,
        chain_priority=fw.int_in("chain_priority", -10, -300, -1),
        set_size_ipv4=fw.int_in("set_size_ipv4", 65536, 1, 16_777_216),
        set_size_ipv6=fw.int_in("set_size_ipv6", 65536, 1, 16_777_216),
        log_drops=fw.get("log_drops", bool, True, "true or false"),
        log_rate_per_minute=fw.int_in("log_rate_per_minute", 30, 1, 6000),
        ipv6_prefix=ipv6_prefix,
        profiles=profiles,
    )
    fw.finish()
    return firewall, permit_test


def _ttl(root: _Section) -> TtlBounds:
    sec = root.section("ttl")
    lo = sec.int_in("min", 60, 1, 31_536_000)
    hi = sec.int_in("max", 604800, 1, 31_536_000)
    default = sec.int_in("default", 86400, 1, 31_536_000)
    if not lo <= default <= hi:
        raise ConfigError("ttl", f"need min <= default <= max, got {lo} <= {default} <= {hi}")
    sec.finish()
    return TtlBounds(minimum=lo, maximum=hi, default=default)


def _api(root: _Section) -> ApiConfig:
    sec = root.section("api")
    listen, port = _parse_listen(sec, "listen", "[::]:7443")
    defaults = ApiConfig()
    api = ApiConfig(
        listen=listen,
        port=port,
        server_cert=Path(sec.get("server_cert", str, str(defaults.server_cert), "a file path")),
        server_key=Path(sec.get("server_key", str, str(defaults.server_key), "a file path")),
        client_ca=Path(sec.get("client_ca", str, str(defaults.client_ca), "a file path")),
        allowed_identities=tuple(sec.strings("allowed_identities", "URI SANs or CNs")),
        control_plane_sources=_parse_list(sec, "control_plane_sources", _parse_network, _NETWORKS),
        reflection=sec.get("reflection", bool, False, "true or false"),
        max_message_bytes=sec.int_in("max_message_bytes", 32 * 1024 * 1024, 4096, 1 << 30),
        max_concurrent_rpcs=sec.int_in("max_concurrent_rpcs", 256, 1, 100_000),
        max_watchers=sec.int_in("max_watchers", defaults.max_watchers, 1, 10_000),
        watch_buffer_events=sec.int_in(
            # No more than the retained history (agent.state.HISTORY): further behind, a
            # watcher needs a resync anyway.
            "watch_buffer_events",
            defaults.watch_buffer_events,
            10,
            10_000,
        ),
        watch_stall_timeout_s=sec.int_in(
            "watch_stall_timeout_s", defaults.watch_stall_timeout_s, 1, 3600
        ),
        max_connections=sec.int_in("max_connections", defaults.max_connections, 1, 100_000),
        max_connections_per_source=sec.int_in(
            "max_connections_per_source", defaults.max_connections_per_source, 1, 100_000
        ),
        handshake_timeout_s=sec.int_in("handshake_timeout_s", defaults.handshake_timeout_s, 1, 30),
        # At least 60 s: the gate counts a connection gRPC closes within the handshake
        # timeout as a failed handshake, which an idle close must never look like.
        max_connection_idle_s=sec.int_in(
            "max_connection_idle_s", defaults.max_connection_idle_s, 60, 86_400
        ),
        max_connection_age_s=sec.int_in(
            "max_connection_age_s", defaults.max_connection_age_s, 60, 7 * 86_400
        ),
        keepalive_s=sec.int_in("keepalive_s", defaults.keepalive_s, 10, 86_400),
    )
    if api.max_connections_per_source > api.max_connections:
        raise ConfigError(
            sec.key("max_connections_per_source"),
            f"got {api.max_connections_per_source}; expected at most max_connections "
            f"({api.max_connections})",
        )
    sec.finish()
    return api


def _signing(root: _Section) -> SigningConfig:
    sec = root.section("signing")
    keys_sec = sec.section("trusted_keys")
    trusted = tuple(
        (keyid, keys_sec.get(keyid, str, "", "a base64 Ed25519 public key"))
        for keyid, _ in list(keys_sec.items())
    )
    keys_sec.finish()
    signing = SigningConfig(
        trusted_keys=trusted,
        clock_skew_s=sec.int_in("clock_skew_s", 30, 0, 3600),
        max_window_s=sec.int_in("max_window_s", 300, 1, 86400),
    )
    sec.finish()
    return signing


def _limits(root: _Section) -> LimitsConfig:
    sec = root.section("limits")
    limits = LimitsConfig(
        max_entries_per_request=sec.int_in("max_entries_per_request", 65_536, 1, 10_000_000),
        max_entries=sec.int_in("max_entries", 65_536, 1, 10_000_000),
    )
    sec.finish()
    return limits


def _metrics(root: _Section) -> MetricsConfig:
    sec = root.section("metrics")
    listen, port = _parse_listen(sec, "listen", "127.0.0.1:9617")
    tls_cert = sec.get("tls_cert", str, "", "a file path (PEM certificate chain)")
    tls_key = sec.get("tls_key", str, "", "a file path (PEM private key)")
    if bool(tls_cert) != bool(tls_key):
        missing = "tls_key" if tls_cert else "tls_cert"
        raise ConfigError(
            sec.key(missing), "set both tls_cert and tls_key for HTTPS, or neither for HTTP"
        )
    metrics = MetricsConfig(
        listen=listen,
        port=port,
        scrape_sources=_parse_list(sec, "scrape_sources", _parse_network, _NETWORKS),
        tls_cert=Path(tls_cert) if tls_cert else None,
        tls_key=Path(tls_key) if tls_key else None,
    )
    sec.finish()
    return metrics


def _state(root: _Section) -> StateConfig:
    sec = root.section("state")
    state = StateConfig(
        directory=Path(sec.get("directory", str, "/var/lib/vicifast-agent", "a directory")),
        audit_retention_days=sec.int_in("audit_retention_days", 7, 1, 3650),
    )
    sec.finish()
    return state


def _verify(root: _Section) -> VerifyConfig:
    sec = root.section("verify")
    verify = VerifyConfig(
        interval_s=sec.int_in("interval_s", 30, 1, 86_400),
        elements_interval_s=sec.int_in("elements_interval_s", 3600, 60, 7 * 86_400),
    )
    sec.finish()
    return verify


_GROUP = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
# sun_path holds 108 bytes including the terminating NUL.
_SOCKET_PATH_MAX_BYTES = 107


def _local(root: _Section, ttl: TtlBounds) -> LocalConfig:
    sec = root.section("local")
    default = LocalConfig()
    socket_text = sec.get("socket", str, str(default.socket), "an absolute path")
    if not socket_text.startswith("/") or len(socket_text.encode()) > _SOCKET_PATH_MAX_BYTES:
        raise ConfigError(
            sec.key("socket"),
            f"got {socket_text!r}; expected an absolute path of at most "
            f"{_SOCKET_PATH_MAX_BYTES} bytes",
        )
    group = sec.get("group", str, "", "a group name, or '' for root only")
    if group and not _GROUP.fullmatch(group):
        raise ConfigError(
            sec.key("group"), f"got {group!r}; expected a group name such as 'vicifast-portal'"
        )
    local = LocalConfig(
        enabled=sec.get("enabled", bool, True, "true or false"),
        socket=Path(socket_text),
        group=group,
        ttl_cap_s=sec.int_in("ttl_cap_s", default.ttl_cap_s, 1, 31_536_000),
        rate_limit_per_minute=sec.int_in("rate_limit_per_minute", 30, 1, 60_000),
        rate_limit_burst=sec.int_in("rate_limit_burst", 10, 1, 10_000),
    )
    if local.ttl_cap_s < ttl.minimum:
        raise ConfigError(
            sec.key("ttl_cap_s"),
            f"got {local.ttl_cap_s}; expected at least ttl.min ({ttl.minimum})",
        )
    sec.finish()
    return local


def _check_ports(profiles: tuple[Profile, ...], api: ApiConfig, metrics: MetricsConfig) -> None:
    if api.port == metrics.port:
        raise ConfigError("metrics.listen", f"port {metrics.port} is already the api.listen port")
    for prof in profiles:
        for rng in prof.ports:
            for name, port in (("api.listen", api.port), ("metrics.listen", metrics.port)):
                if rng.contains("tcp", port):
                    raise ConfigError(
                        name, f"port {port} is protected by profile {prof.name!r}; pick another"
                    )


def parse_config(text: str, source: Path | None = None) -> AgentConfig:
    """Parse and validate configuration text; raise ``ConfigError`` naming the key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("(file)", f"not valid TOML: {exc}") from exc
    root = _Section(data, "")
    agent_id = root.get("agent_id", str, "", "the agent's id, e.g. 'dialer-01.example'")
    if not _AGENT_ID.fullmatch(agent_id):
        raise ConfigError(
            "agent_id", f"got {agent_id!r}; expected 1-64 of [A-Za-z0-9._-], starting alnum"
        )
    profiles, default_profile = _profiles(root)
    firewall, permit_test = _firewall(root, profiles)
    ttl = _ttl(root)
    api = _api(root)
    signing = _signing(root)
    limits = _limits(root)
    metrics = _metrics(root)
    state = _state(root)
    verify = _verify(root)
    local = _local(root, ttl)
    root.finish()
    _check_ports(profiles, api, metrics)
    guarded = []
    if api.control_plane_sources:
        guarded.append(GuardedPort("api", api.port, api.control_plane_sources))
    if metrics.scrape_sources:
        guarded.append(GuardedPort("metrics", metrics.port, metrics.scrape_sources))
    return AgentConfig(
        agent_id=agent_id,
        firewall=replace(firewall, guarded_ports=tuple(guarded)),
        address_policy=AddressPolicy(
            ipv6_prefix=firewall.ipv6_prefix, permit_test_ranges=permit_test
        ),
        ttl=ttl,
        default_profile=default_profile,
        api=api,
        signing=signing,
        limits=limits,
        metrics=metrics,
        state=state,
        verify=verify,
        local=local,
        source=source,
    )


def load_config(path: Path = DEFAULT_CONFIG_PATH) -> AgentConfig:
    """Read and validate the file at ``path``."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("(file)", f"cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError("(file)", f"{path} is not UTF-8") from exc
    return parse_config(text, source=path)
