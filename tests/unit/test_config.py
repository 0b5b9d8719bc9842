"""The configuration file: the shipped example, safe defaults, and every way a file can be wrong.

A broken file is refused with ``ConfigError`` whose ``key`` is the exact dotted key to fix and
whose message quotes the bad value; RULESET.md's default profile comes out of an empty file.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from agent.config import (
    AgentConfig,
    GuardedPort,
    PortRange,
    load_config,
    parse_config,
)
from agent.errors import ConfigError, ErrorKind

EXAMPLE = Path(__file__).resolve().parents[2] / "packaging" / "agent.toml"

# RULESET.md "What is gated": SIP 5060/udp+tcp, SIP-TLS 5061/tcp, HTTPS 443/tcp, Asterisk
# WebRTC WS/WSS 8088-8089/tcp, IAX2 4569/udp.
RULESET_AGENT_PORTS = {
    PortRange("udp", 5060, 5060),
    PortRange("tcp", 5060, 5060),
    PortRange("tcp", 5061, 5061),
    PortRange("tcp", 443, 443),
    PortRange("tcp", 8088, 8089),
    PortRange("udp", 4569, 4569),
}

MINIMAL = 'agent_id = "dialer-01"\n'


def config(body: str = "") -> AgentConfig:
    return parse_config(MINIMAL + body)


def ports_of(cfg: AgentConfig, profile: str) -> set[PortRange]:
    return set(cfg.firewall.profile(profile).ports)


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


# --- the shipped example and the defaults ---------------------------------------------------


def test_example_config_parses_to_the_ruleset_default_profile() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.source == EXAMPLE
    assert cfg.agent_id == "dialer-01.example.com"
    assert cfg.profile_names == ("agent",)
    assert cfg.default_profile == "agent"
    assert ports_of(cfg, "agent") == RULESET_AGENT_PORTS
    assert cfg.firewall.guarded_ports == ()


def test_example_config_states_the_defaults() -> None:
    # Every value the example shows is documented as the default: both must agree.
    example = load_config(EXAMPLE)
    empty = parse_config('agent_id = "dialer-01.example.com"\n')
    assert example.firewall == empty.firewall
    assert example.address_policy == empty.address_policy
    assert example.ttl == empty.ttl
    assert example.api == empty.api
    assert example.signing == empty.signing
    assert example.limits == empty.limits
    assert example.metrics == empty.metrics
    assert example.state == empty.state


def test_minimal_config_gives_safe_defaults() -> None:
    cfg = config()
    assert cfg.agent_id == "dialer-01"
    assert cfg.profile_names == ("agent",)
    assert "admin" not in cfg.profile_names
    assert cfg.default_profile == "agent"
    assert ports_of(cfg, "agent") == RULESET_AGENT_PORTS
    assert cfg.firewall.profile("agent").static_sources == ()
    # neither RTP nor HTTP 80 is gated by default
    agent = cfg.firewall.profile("agent")
    assert not any(p.contains("udp", 10000) or p.contains("tcp", 80) for p in agent.ports)

    assert (cfg.ttl.minimum, cfg.ttl.maximum, cfg.ttl.default) == (60, 604800, 86400)
    assert cfg.address_policy.ipv6_prefix == 64
    assert cfg.firewall.ipv6_prefix == 64
    assert cfg.address_policy.permit_test_ranges is False

    assert cfg.firewall.table == "vicifast"
    assert cfg.firewall.chain_priority < 0
    assert cfg.firewall.guarded_ports == ()

    assert cfg.metrics.listen == "127.0.0.1:9617"
    assert ipaddress.ip_address(cfg.metrics.listen.rpartition(":")[0]).is_loopback
    assert cfg.metrics.port == 9617
    assert cfg.api.port == 7443
    assert cfg.api.allowed_identities == ()
    assert cfg.api.reflection is False
    assert cfg.signing.trusted_keys == ()
    assert (cfg.signing.clock_skew_s, cfg.signing.max_window_s) == (30, 300)
    assert cfg.state.audit_retention_days == 7
    assert cfg.source is None


# --- valid configurations -------------------------------------------------------------------


def test_admin_profile_and_static_sources_per_profile_and_for_all() -> None:
    cfg = config(
        """
default_profile = "agent"
[firewall]
ipv6_prefix = 128
permit_test_ranges = true
[profiles.agent]
ports = ["5060/udp", "5061/tcp"]
[profiles.admin]
ports = ["22/tcp", "3306/tcp"]
[static_sources]
all = ["203.0.113.0/24", "2001:db8::/48"]
admin = ["198.51.100.7/32"]
"""
    )
    assert cfg.profile_names == ("agent", "admin")
    assert ports_of(cfg, "admin") == {PortRange("tcp", 22, 22), PortRange("tcp", 3306, 3306)}
    assert cfg.firewall.profile("agent").static_sources == (
        net("203.0.113.0/24"),
        net("2001:db8::/48"),
    )
    assert cfg.firewall.profile("admin").static_sources == (
        net("203.0.113.0/24"),
        net("2001:db8::/48"),
        net("198.51.100.7/32"),
    )
    assert cfg.address_policy.ipv6_prefix == 128
    assert cfg.firewall.ipv6_prefix == 128
    assert cfg.address_policy.permit_test_ranges is True


def test_default_profile_is_the_first_when_there_is_no_agent_profile() -> None:
    cfg = config('[profiles.sip]\nports = ["5060/udp"]\n[profiles.web]\nports = ["443/tcp"]\n')
    assert cfg.default_profile == "sip"


def test_adjacent_port_ranges_in_different_profiles_are_fine() -> None:
    cfg = config(
        '[profiles.agent]\nports = ["8088-8089/tcp"]\n[profiles.admin]\nports = ["8090/tcp"]\n'
    )
    assert ports_of(cfg, "admin") == {PortRange("tcp", 8090, 8090)}


def test_same_port_number_on_other_protocol_is_not_an_overlap() -> None:
    cfg = config('[profiles.agent]\nports = ["5060/udp"]\n[profiles.admin]\nports = ["5060/tcp"]\n')
    assert ports_of(cfg, "admin") == {PortRange("tcp", 5060, 5060)}


@pytest.mark.parametrize(
    ("body", "guarded"),
    [
        ("", ()),
        ("[api]\ncontrol_plane_sources = []\n[metrics]\nscrape_sources = []\n", ()),
        (
            '[api]\ncontrol_plane_sources = ["192.0.2.0/24", "2001:db8::/32"]\n',
            (GuardedPort("api", 7443, (net("192.0.2.0/24"), net("2001:db8::/32"))),),
        ),
        (
            '[metrics]\nlisten = "[::]:9100"\nscrape_sources = ["10.0.0.0/8"]\n',
            (GuardedPort("metrics", 9100, (net("10.0.0.0/8"),)),),
        ),
        (
            '[api]\nlisten = "0.0.0.0:50051"\ncontrol_plane_sources = ["192.0.2.1/32"]\n'
            '[metrics]\nscrape_sources = ["10.0.0.0/8"]\n',
            (
                GuardedPort("api", 50051, (net("192.0.2.1/32"),)),
                GuardedPort("metrics", 9617, (net("10.0.0.0/8"),)),
            ),
        ),
    ],
    ids=["none", "empty-lists", "api", "metrics", "both"],
)
def test_guarded_ports_exist_only_when_sources_are_configured(
    body: str, guarded: tuple[GuardedPort, ...]
) -> None:
    assert config(body).firewall.guarded_ports == guarded


@pytest.mark.parametrize(
    ("listen", "port"),
    [
        ("127.0.0.1:9100", 9100),
        ("[::1]:9100", 9100),
        ("[::]:1", 1),
        ("0.0.0.0:65535", 65535),
        ("localhost:9100", 9100),
    ],
)
def test_listen_is_host_and_port(listen: str, port: int) -> None:
    cfg = config(f'[metrics]\nlisten = "{listen}"\n')
    assert (cfg.metrics.listen, cfg.metrics.port) == (listen, port)


# --- broken configurations ------------------------------------------------------------------
# (file text, the dotted key the error must name, text the message must quote)

BROKEN = [
    # agent_id
    pytest.param("", "agent_id", "''", id="agent_id-missing"),
    pytest.param("agent_id = 5\n", "agent_id", "5", id="agent_id-int"),
    pytest.param('agent_id = "-dialer"\n', "agent_id", "'-dialer'", id="agent_id-leading-dash"),
    pytest.param('agent_id = "a b"\n', "agent_id", "'a b'", id="agent_id-space"),
    pytest.param('agent_id = "a\\n"\n', "agent_id", "'a\\n'", id="agent_id-newline"),
    pytest.param(f'agent_id = "{"a" * 65}"\n', "agent_id", "a" * 65, id="agent_id-65-chars"),
    # invalid TOML
    pytest.param('agent_id = "dialer-01\n', "(file)", "not valid TOML", id="toml-unterminated"),
    pytest.param(MINIMAL + "[firewall\n", "(file)", "not valid TOML", id="toml-bad-header"),
    pytest.param(MINIMAL + MINIMAL, "(file)", "not valid TOML", id="toml-duplicate-key"),
    # unknown keys (typos) at every level
    pytest.param(MINIMAL + 'agentid = "x"\n', "agentid", "agentid", id="typo-top"),
    pytest.param(MINIMAL + '[firewall]\ntabel = "x"\n', "firewall.tabel", "tabel", id="typo-fw"),
    pytest.param(
        MINIMAL + '[profiles.agent]\nports = ["5060/udp"]\nport = ["22/tcp"]\n',
        "profiles.agent.port",
        "port",
        id="typo-profile",
    ),
    pytest.param(
        MINIMAL + '[static_sources]\nal = ["192.0.2.0/24"]\n',
        "static_sources.al",
        "al",
        id="typo-static",
    ),
    pytest.param(MINIMAL + "[ttl]\nmaximum = 5\n", "ttl.maximum", "maximum", id="typo-ttl"),
    pytest.param(
        MINIMAL + '[api]\nlisten_addr = "x"\n', "api.listen_addr", "listen_addr", id="typo-api"
    ),
    pytest.param(
        MINIMAL + "[signing]\nclock_skew = 5\n", "signing.clock_skew", "clock_skew", id="typo-sign"
    ),
    pytest.param(MINIMAL + "[limits]\nmax = 5\n", "limits.max", "max", id="typo-limits"),
    pytest.param(
        MINIMAL + "[metrics]\nscrape = []\n", "metrics.scrape", "scrape", id="typo-metrics"
    ),
    pytest.param(MINIMAL + '[state]\ndir = "/x"\n', "state.dir", "dir", id="typo-state"),
    # wrong types
    pytest.param(MINIMAL + "firewall = 5\n", "firewall", "5", id="type-section-not-table"),
    pytest.param(MINIMAL + "[profiles]\nagent = 5\n", "profiles.agent", "5", id="type-profile"),
    pytest.param(
        MINIMAL + '[firewall]\nchain_priority = "-10"\n',
        "firewall.chain_priority",
        "'-10'",
        id="type-str-for-int",
    ),
    pytest.param(
        MINIMAL + "[firewall]\nset_size_ipv4 = true\n",
        "firewall.set_size_ipv4",
        "True",
        id="type-bool-for-int",
    ),
    pytest.param(
        MINIMAL + "[firewall]\nset_size_ipv6 = 1.5\n",
        "firewall.set_size_ipv6",
        "1.5",
        id="type-float-for-int",
    ),
    pytest.param(
        MINIMAL + '[firewall]\npermit_test_ranges = "yes"\n',
        "firewall.permit_test_ranges",
        "'yes'",
        id="type-str-for-bool",
    ),
    pytest.param(
        MINIMAL + "[firewall]\nlog_drops = 1\n", "firewall.log_drops", "1", id="type-int-for-bool"
    ),
    pytest.param(
        MINIMAL + '[profiles.agent]\nports = "5060/udp"\n',
        "profiles.agent.ports",
        "'5060/udp'",
        id="type-ports-not-list",
    ),
    pytest.param(
        MINIMAL + "[profiles.agent]\nports = [5060]\n",
        "profiles.agent.ports",
        "5060",
        id="type-port-int",
    ),
    pytest.param(
        MINIMAL + "[signing.trusted_keys]\nk1 = 5\n",
        "signing.trusted_keys.k1",
        "5",
        id="type-trusted-key",
    ),
    pytest.param(MINIMAL + "[api]\nlisten = 7443\n", "api.listen", "7443", id="type-listen-int"),
    # integers out of range
    pytest.param(
        MINIMAL + "[firewall]\nchain_priority = 0\n",
        "firewall.chain_priority",
        "0",
        id="priority-0-not-before-filter",
    ),
    pytest.param(
        MINIMAL + "[firewall]\nset_size_ipv4 = 0\n", "firewall.set_size_ipv4", "0", id="set-size-0"
    ),
    pytest.param(MINIMAL + "[ttl]\nmin = 0\n", "ttl.min", "0", id="ttl-min-0"),
    pytest.param(
        MINIMAL + "[state]\naudit_retention_days = 0\n",
        "state.audit_retention_days",
        "0",
        id="retention-0",
    ),
    # ports
    pytest.param(
        MINIMAL + '[profiles.agent]\nports = ["5060"]\n',
        "profiles.agent.ports",
        "'5060'",
        id="port-no-protocol",
    ),
    pytest.param(
        MINIMAL + '[profiles.agent]\nports = ["5060/sctp"]\n',
        "profiles.agent.ports",
        "'5060/sctp'",
        id="port-sctp",
    ),
    pytest.param(
        MINIMAL + '[profiles.agent]\nports = ["5060/UDP"]\n',
        "profiles.agent.ports",
        "'5060/UDP'",
        id="port-upper-case-protocol",
    ),
    pytest.param(
        MINIMAL + '[profiles.agent]\nports = ["sip/udp"]\n',
        "profiles.agent.ports",
        "'sip/udp'",
        id="port-name",
    ),
    pytest.param(
        MINIMAL + '[profiles.agent]\nports = [" 5060/udp"]\n',
        "profiles.agent.ports",
        "' 5060/udp'",
        id="port-space",
    ),
    pytest.param(
        MINIMAL + '[profiles.agent]\nports = ["+5060/udp"]\n',
        "profiles.agent.ports",
        "'+5060/udp'",
        id="port-plus",
    ),
    pytest.param(
        MINIMAL + '[profiles.agent]\nports = ["0/tcp"]\n',
        "profiles.agent.ports",
        "'0/tcp'",
        id="port-0",
    ),
    pytest.param(
        MINIMAL + '[profiles.agent]\nports = ["65536/tcp"]\n',
        "profiles.agent.ports",
        "'65536/tcp'",
        id="port-65536",
    ),
    pytest.param(
        MINIMAL + '[profiles.agent]\nports = ["0-10/tcp"]\n',
        "profiles.agent.ports",
        "'0-10/tcp'",
        id="range-from-0",
    ),
    pytest.param(
        MINIMAL + '[profiles.agent]\nports = ["65535-65536/udp"]\n',
        "profiles.agent.ports",
        "'65535-65536/udp'",
        id="range-to-65536",
    ),
    pytest.param(
        MINIMAL + '[profiles.agent]\nports = ["8089-8088/tcp"]\n',
        "profiles.agent.ports",
        "'8089-8088/tcp'",
        id="range-reversed",
    ),
    pytest.param(
        MINIMAL + '[profiles.agent]\nports = ["1-2-3/tcp"]\n',
        "profiles.agent.ports",
        "'1-2-3/tcp'",
        id="range-three-parts",
    ),
    pytest.param(
        MINIMAL + '[profiles.agent]\nports = ["\u00b2/udp"]\n',
        "profiles.agent.ports",
        "'\u00b2/udp'",
        id="port-superscript-digit",
    ),
    pytest.param(
        MINIMAL + "[profiles.agent]\nports = []\n",
        "profiles.agent.ports",
        "at least one port",
        id="profile-without-ports",
    ),
    pytest.param(
        MINIMAL + "[profiles.agent]\n",
        "profiles.agent.ports",
        "at least one port",
        id="profile-ports-missing",
    ),
    # profiles
    pytest.param(
        MINIMAL
        + '[profiles.agent]\nports = ["5060/udp"]\n[profiles.admin]\nports = ["5000-5100/udp"]\n',
        "profiles.admin.ports",
        "5000-5100/udp",
        id="ports-overlap-between-profiles",
    ),
    pytest.param(
        MINIMAL
        + '[profiles.agent]\nports = ["8088-8089/tcp"]\n[profiles.admin]\nports = ["8089/tcp"]\n',
        "profiles.admin.ports",
        "8089/tcp",
        id="range-edge-overlap-between-profiles",
    ),
    pytest.param(
        MINIMAL + '[profiles.Agent]\nports = ["5060/udp"]\n',
        "profiles.Agent",
        "Agent",
        id="profile-name-upper-case",
    ),
    pytest.param(
        MINIMAL + '[profiles.abcdefghijklmnopq]\nports = ["5060/udp"]\n',
        "profiles.abcdefghijklmnopq",
        "abcdefghijklmnopq",
        id="profile-name-17-chars",
    ),
    pytest.param(
        MINIMAL + '[profiles.1st]\nports = ["5060/udp"]\n',
        "profiles.1st",
        "1st",
        id="profile-name-digit-first",
    ),
    pytest.param(
        MINIMAL + 'default_profile = "admin"\n',
        "default_profile",
        "'admin'",
        id="default-profile-unknown",
    ),
    # static sources
    pytest.param(
        MINIMAL + '[static_sources]\nall = ["203.0.113.7/24"]\n',
        "static_sources.all",
        "'203.0.113.7/24'",
        id="static-host-bits",
    ),
    pytest.param(
        MINIMAL + '[static_sources]\nagent = ["2001:db8::1/48"]\n',
        "static_sources.agent",
        "'2001:db8::1/48'",
        id="static-v6-host-bits",
    ),
    pytest.param(
        MINIMAL + '[static_sources]\nagent = ["carrier.example"]\n',
        "static_sources.agent",
        "'carrier.example'",
        id="static-hostname",
    ),
    pytest.param(
        MINIMAL + '[static_sources]\nall = [" 203.0.113.0/24"]\n',
        "static_sources.all",
        "' 203.0.113.0/24'",
        id="static-space",
    ),
    pytest.param(
        MINIMAL + '[static_sources]\nadmin = ["203.0.113.0/24"]\n',
        "static_sources.admin",
        "admin",
        id="static-unknown-profile",
    ),
    pytest.param(
        MINIMAL + '[api]\ncontrol_plane_sources = ["10.0.0.1/8"]\n',
        "api.control_plane_sources",
        "'10.0.0.1/8'",
        id="control-plane-host-bits",
    ),
    pytest.param(
        MINIMAL + '[metrics]\nscrape_sources = ["10.0.0.0/33"]\n',
        "metrics.scrape_sources",
        "'10.0.0.0/33'",
        id="scrape-bad-prefix",
    ),
    # firewall
    pytest.param(
        MINIMAL + "[firewall]\nipv6_prefix = 48\n", "firewall.ipv6_prefix", "48", id="ipv6-48"
    ),
    pytest.param(
        MINIMAL + "[firewall]\nipv6_prefix = 96\n", "firewall.ipv6_prefix", "96", id="ipv6-96"
    ),
    pytest.param(
        MINIMAL + '[firewall]\ntable = "Vici-fast"\n',
        "firewall.table",
        "'Vici-fast'",
        id="table-name-chars",
    ),
    pytest.param(MINIMAL + '[firewall]\ntable = ""\n', "firewall.table", "''", id="table-empty"),
    pytest.param(
        MINIMAL + f'[firewall]\ntable = "{"t" * 33}"\n',
        "firewall.table",
        "t" * 33,
        id="table-33-chars",
    ),
    # ttl
    pytest.param(
        MINIMAL + "[ttl]\nmin = 1000\nmax = 100\ndefault = 500\n",
        "ttl",
        "1000 <= 500 <= 100",
        id="ttl-min-above-max",
    ),
    pytest.param(
        MINIMAL + "[ttl]\ndefault = 10\n", "ttl", "60 <= 10 <= 604800", id="ttl-default-below-min"
    ),
    pytest.param(
        MINIMAL + "[ttl]\nmax = 3600\n", "ttl", "60 <= 86400 <= 3600", id="ttl-default-above-max"
    ),
    # listeners
    pytest.param(MINIMAL + '[api]\nlisten = "7443"\n', "api.listen", "'7443'", id="listen-no-host"),
    pytest.param(
        MINIMAL + '[api]\nlisten = "::7443"\n', "api.listen", "'::7443'", id="listen-v6-no-brackets"
    ),
    pytest.param(
        MINIMAL + '[api]\nlisten = "[::]:"\n', "api.listen", "'[::]:'", id="listen-no-port"
    ),
    pytest.param(MINIMAL + '[api]\nlisten = ":7443"\n', "api.listen", "':7443'", id="listen-empty"),
    pytest.param(MINIMAL + '[api]\nlisten = "[::]:0"\n', "api.listen", "'[::]:0'", id="listen-0"),
    pytest.param(
        MINIMAL + '[api]\nlisten = "[::]:65536"\n', "api.listen", "'[::]:65536'", id="listen-65536"
    ),
    pytest.param(
        MINIMAL + '[metrics]\nlisten = "localhost"\n',
        "metrics.listen",
        "'localhost'",
        id="metrics-listen-no-port",
    ),
    pytest.param(
        MINIMAL + '[api]\nlisten = "[::]:9617"\n',
        "metrics.listen",
        "9617",
        id="api-and-metrics-same-port",
    ),
    pytest.param(
        MINIMAL + '[api]\nlisten = "[::]:443"\n', "api.listen", "443", id="api-port-protected"
    ),
    pytest.param(
        MINIMAL + '[api]\nlisten = "[::]:8089"\n',
        "api.listen",
        "8089",
        id="api-port-inside-protected-range",
    ),
    pytest.param(
        MINIMAL + '[metrics]\nlisten = "127.0.0.1:8088"\n',
        "metrics.listen",
        "8088",
        id="metrics-port-inside-protected-range",
    ),
    pytest.param(
        MINIMAL + '[profiles.admin]\nports = ["7000-8000/tcp"]\n',
        "api.listen",
        "7443",
        id="profile-range-covers-default-api-port",
    ),
    # digits that str.isdigit() accepts but int() or a socket does not
    pytest.param(
        MINIMAL + '[api]\nlisten = "[::]:7443\u00b2"\n',
        "api.listen",
        "7443\u00b2",
        id="listen-superscript-digit",
    ),
    pytest.param(
        MINIMAL + '[api]\nlisten = "[::]:\u0667\u0664\u0664\u0663"\n',
        "api.listen",
        "\u0667\u0664\u0664\u0663",
        id="listen-arabic-indic-digits",
    ),
    pytest.param(
        MINIMAL + '[profiles.agent]\nports = ["\u0665\u0660\u0666\u0660/udp"]\n',
        "profiles.agent.ports",
        "\u0665\u0660\u0666\u0660/udp",
        id="port-arabic-indic-digits",
    ),
    pytest.param(
        MINIMAL + '[profiles.agent]\nports = ["5060-/udp"]\n',
        "profiles.agent.ports",
        "'5060-/udp'",
        id="range-without-end",
    ),
]


@pytest.mark.parametrize(("text", "key", "quoted"), BROKEN)
def test_broken_config_names_the_key_and_quotes_the_value(text: str, key: str, quoted: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    err = info.value
    assert err.key == key
    assert err.reason == "invalid_config"
    assert err.kind is ErrorKind.INVALID_ARGUMENT
    assert quoted in err.detail


def test_load_config_of_a_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert info.value.key == "(file)"
    assert str(missing) in info.value.detail


def test_load_config_of_a_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.key == "(file)"
    assert str(tmp_path) in info.value.detail


def test_load_config_of_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(b'agent_id = "dialer-\xff"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "(file)"
    assert str(path) in info.value.detail


def test_load_config_reads_the_file_and_remembers_its_path(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(MINIMAL + '[profiles.admin]\nports = ["22/tcp"]\n', encoding="utf-8")
    cfg = load_config(path)
    assert cfg.source == path
    assert cfg.profile_names == ("admin",)
    assert cfg.default_profile == "admin"
