"""RULESET.md as structural facts of the rendered libnftables batches.

``render_table`` may only ever speak about ``inet <table>``; the element batch is JSON that no
subject can break out of, and every element comment fits the kernel's 128 bytes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import AgentConfig, FirewallConfig, parse_config
from agent.model import ELEMENT_COMMENT_MAX_BYTES, Address, Element, EntryKey
from agent.rules.plan import plan_changes
from agent.rules.render import (
    IPV6_64_MASK,
    element_comment,
    encode_commands,
    encode_element_batch,
    render_delete_table,
    render_table,
)

Command = dict[str, Any]

DEFAULT = 'agent_id = "dialer-01"\n'
CUSTOM = """agent_id = "dialer-01"
[firewall]
table = "vf_test"
chain_priority = -150
set_size_ipv4 = 1000
set_size_ipv6 = 2000
ipv6_prefix = 128
log_drops = false
[profiles.agent]
ports = ["5060/udp", "5060/tcp", "8088-8089/tcp"]
[profiles.admin]
ports = ["22/tcp", "3306/tcp"]
[static_sources]
all = ["203.0.113.0/24", "2001:db8::/48"]
admin = ["203.0.113.0/25", "198.51.100.0/24", "2001:db8:1::/48", "2001:db8:1::1/128"]
[api]
control_plane_sources = ["192.0.2.0/24", "2001:db8:ff::/48"]
[metrics]
listen = "[::]:9617"
scrape_sources = ["192.0.2.10/32"]
"""
UDP_ONLY = """agent_id = "dialer-01"
[firewall]
table = "t2"
chain_priority = -1
[profiles.sip]
ports = ["5060/udp", "10000-20000/udp"]
"""

CONFIGS = {"default": DEFAULT, "custom": CUSTOM, "udp_only": UDP_ONLY}


def cfg_of(name: str) -> AgentConfig:
    return parse_config(CONFIGS[name])


@pytest.fixture(params=sorted(CONFIGS))
def fw(request: pytest.FixtureRequest) -> FirewallConfig:
    return cfg_of(request.param).firewall


# --- helpers that read the batch like a sysadmin reads `nft list` ---------------------------


def verb_and_object(cmd: Command) -> tuple[str, str, dict[str, Any]]:
    ((verb, body),) = cmd.items()
    ((kind, obj),) = body.items()
    return verb, kind, obj


def objects(cmds: list[Command], verb: str, kind: str) -> list[dict[str, Any]]:
    out = []
    for cmd in cmds:
        v, k, obj = verb_and_object(cmd)
        if (v, k) == (verb, kind):
            out.append(obj)
    return out


def named(cmds: list[Command], verb: str, kind: str) -> dict[str, dict[str, Any]]:
    return {o["name"]: o for o in objects(cmds, verb, kind)}


def rules(cmds: list[Command], chain: str) -> list[list[Command]]:
    return [r["expr"] for r in objects(cmds, "add", "rule") if r["chain"] == chain]


def matches(expr: list[Command]) -> Iterator[dict[str, Any]]:
    for e in expr:
        if "match" in e:
            yield e["match"]


def jump_target(expr: list[Command]) -> str | None:
    for e in expr:
        if "jump" in e:
            return str(e["jump"]["target"])
    return None


def dport_ports(expr: list[Command]) -> tuple[str, set[int]] | None:
    """(protocol, every port number) of a ``tcp|udp dport`` match, else None."""
    for m in matches(expr):
        left = m["left"]
        if isinstance(left, dict) and left.get("payload", {}).get("field") == "dport":
            right = m["right"]
            items = right["set"] if isinstance(right, dict) else [right]
            ports: set[int] = set()
            for item in items:
                if isinstance(item, dict):
                    lo, hi = item["range"]
                    ports.update(range(lo, hi + 1))
                else:
                    ports.add(item)
            return left["payload"]["protocol"], ports
    return None


def set_lookup_key(expr: list[Command], set_name: str) -> Any:
    for m in matches(expr):
        if m["right"] == "@" + set_name:
            return m["left"]
    raise AssertionError(f"no lookup of @{set_name}")


def static_elems(cmds: list[Command], set_name: str) -> list[Any]:
    out: list[Any] = []
    for obj in objects(cmds, "add", "element"):
        if obj["name"] == set_name:
            out += obj["elem"]
    return out


SADDR4 = {"payload": {"protocol": "ip", "field": "saddr"}}
SADDR6 = {"payload": {"protocol": "ip6", "field": "saddr"}}


# --- ownership: our table, all of it, and nothing else --------------------------------------


def test_every_command_addresses_family_inet_and_the_configured_table_only(
    fw: FirewallConfig,
) -> None:
    cmds = render_table(fw)
    assert cmds[0] == {"add": {"table": {"family": "inet", "name": fw.table}}}
    for cmd in cmds:
        _, kind, obj = verb_and_object(cmd)
        assert obj["family"] == "inet"
        assert (obj["name"] if kind == "table" else obj["table"]) == fw.table


def test_no_command_flushes_or_deletes_the_ruleset_a_table_or_an_allow_set(
    fw: FirewallConfig,
) -> None:
    for cmd in render_table(fw):
        verb, kind, obj = verb_and_object(cmd)
        assert verb in {"add", "flush"}, cmd
        assert kind != "ruleset"
        if verb == "flush":
            assert kind in {"chain", "set"}, cmd
            # dynamic allow sets hold the agent's entries: re-installing must never empty them
            assert not obj["name"].startswith("allow"), cmd


def test_delete_table_deletes_only_the_agents_table() -> None:
    assert render_delete_table("vf_test") == [
        {"delete": {"table": {"family": "inet", "name": "vf_test"}}}
    ]


# --- the input chain ------------------------------------------------------------------------


def test_input_chain_hooks_input_before_filter_with_policy_accept(fw: FirewallConfig) -> None:
    chain = named(render_table(fw), "add", "chain")["input"]
    assert chain["type"] == "filter"
    assert chain["hook"] == "input"
    assert chain["prio"] == fw.chain_priority
    assert chain["prio"] < 0
    assert chain["policy"] == "accept"


@pytest.mark.parametrize(("name", "prio"), [("default", -10), ("custom", -150), ("udp_only", -1)])
def test_input_chain_priority_is_the_configured_one(name: str, prio: int) -> None:
    assert named(render_table(cfg_of(name).firewall), "add", "chain")["input"]["prio"] == prio


def test_loopback_and_replies_are_accepted_before_any_port_jump(fw: FirewallConfig) -> None:
    chain = rules(render_table(fw), "input")
    assert chain[0] == [
        {"match": {"op": "==", "left": {"meta": {"key": "iif"}}, "right": "lo"}},
        {"accept": None},
    ]
    assert chain[1] == [
        {"match": {"op": "==", "left": {"ct": {"key": "direction"}}, "right": "reply"}},
        {"accept": None},
    ]
    assert all(jump_target(r) is not None for r in chain[2:])
    assert len(chain) > 2


def test_there_is_no_conntrack_shortcut_for_established_flows(fw: FirewallConfig) -> None:
    # A revoked source's next packet must be judged by the sets again (RULESET.md "Entries").
    text = json.dumps(render_table(fw))
    assert '"state"' not in text
    assert text.count('"ct"') == 1


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_profile_port_jumps_to_its_profile_chain_and_nothing_else_does(name: str) -> None:
    fw = cfg_of(name).firewall
    cmds = render_table(fw)
    jumped: dict[str, dict[str, set[int]]] = {}
    for expr in rules(cmds, "input"):
        target = jump_target(expr)
        ports = dport_ports(expr)
        if target is None or not target.startswith("prof_"):
            continue
        assert ports is not None
        proto, numbers = ports
        jumped.setdefault(target, {}).setdefault(proto, set()).update(numbers)
    expected: dict[str, dict[str, set[int]]] = {}
    for prof in fw.profiles:
        for p in prof.ports:
            expected.setdefault(f"prof_{prof.name}", {}).setdefault(p.protocol, set()).update(
                range(p.first, p.last + 1)
            )
    assert jumped == expected


def test_default_profile_gates_exactly_the_ruleset_ports() -> None:
    by_proto = {}
    for expr in rules(render_table(cfg_of("default").firewall), "input"):
        if jump_target(expr) == "prof_agent":
            got = dport_ports(expr)
            assert got is not None
            by_proto[got[0]] = got[1]
    assert by_proto == {"tcp": {443, 5060, 5061, 8088, 8089}, "udp": {4569, 5060}}


def test_every_jump_targets_a_chain_of_the_batch(fw: FirewallConfig) -> None:
    cmds = render_table(fw)
    chains = set(named(cmds, "add", "chain"))
    for obj in objects(cmds, "add", "rule"):
        assert obj["chain"] in chains
        target = jump_target(obj["expr"])
        assert target is None or target in chains


# --- profile chains and sets ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "size4", "size6"), [("default", 65536, 65536), ("custom", 1000, 2000)]
)
def test_allow_sets_are_timeout_sets_of_the_configured_size(
    name: str, size4: int, size6: int
) -> None:
    fw = cfg_of(name).firewall
    sets = named(render_table(fw), "add", "set")
    for prof in fw.profiles:
        assert sets[f"allow4_{prof.name}"] == {
            "family": "inet",
            "table": fw.table,
            "name": f"allow4_{prof.name}",
            "type": "ipv4_addr",
            "flags": ["timeout"],
            "size": size4,
        }
        assert sets[f"allow6_{prof.name}"]["type"] == "ipv6_addr"
        assert sets[f"allow6_{prof.name}"]["flags"] == ["timeout"]
        assert sets[f"allow6_{prof.name}"]["size"] == size6


def test_slash_64_policy_masks_the_ipv6_source_before_the_lookup() -> None:
    cmds = render_table(cfg_of("default").firewall)
    assert set_lookup_key(rules(cmds, "prof_agent")[1], "allow6_agent") == {
        "&": [SADDR6, IPV6_64_MASK]
    }
    assert IPV6_64_MASK == "ffff:ffff:ffff:ffff::"


def test_slash_128_policy_looks_up_the_bare_ipv6_source() -> None:
    cmds = render_table(cfg_of("custom").firewall)
    for prof in ("agent", "admin"):
        assert set_lookup_key(rules(cmds, f"prof_{prof}")[1], f"allow6_{prof}") == SADDR6
    assert IPV6_64_MASK not in json.dumps(cmds)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_profile_chain_accepts_allowed_and_static_sources_then_counts_and_drops(name: str) -> None:
    fw = cfg_of(name).firewall
    cmds = render_table(fw)
    counters = {o["name"] for o in objects(cmds, "add", "counter")}
    for prof in fw.profiles:
        p = prof.name
        chain = rules(cmds, f"prof_{p}")
        assert set_lookup_key(chain[0], f"allow4_{p}") == SADDR4
        assert set_lookup_key(chain[2], f"static4_{p}") == SADDR4
        assert set_lookup_key(chain[3], f"static6_{p}") == SADDR6
        assert all(expr[-1] == {"accept": None} for expr in chain[:4])
        assert chain[-1] == [{"counter": f"drop_{p}"}, {"drop": None}]
        assert f"drop_{p}" in counters
        logs = [expr for expr in chain if any("log" in e for e in expr)]
        if fw.log_drops:
            assert logs == [
                [
                    {"limit": {"rate": fw.log_rate_per_minute, "per": "minute"}},
                    {"log": {"prefix": f"vicifast-agent drop {p}: ", "level": "info"}},
                ]
            ]
        else:
            assert logs == []


def test_static_sources_are_collapsed_and_split_by_family() -> None:
    cmds = render_table(cfg_of("custom").firewall)
    sets = named(cmds, "add", "set")
    assert sets["static4_admin"]["flags"] == ["interval"]
    assert sets["static4_admin"]["type"] == "ipv4_addr"
    assert sets["static6_admin"]["type"] == "ipv6_addr"
    # 203.0.113.0/25 lies inside 203.0.113.0/24 (from `all`); the two /48s are one /47
    assert static_elems(cmds, "static4_admin") == [
        {"prefix": {"addr": "198.51.100.0", "len": 24}},
        {"prefix": {"addr": "203.0.113.0", "len": 24}},
    ]
    assert static_elems(cmds, "static6_admin") == [{"prefix": {"addr": "2001:db8::", "len": 47}}]
    assert static_elems(cmds, "static4_agent") == [{"prefix": {"addr": "203.0.113.0", "len": 24}}]
    assert static_elems(cmds, "static6_agent") == [{"prefix": {"addr": "2001:db8::", "len": 48}}]


def test_single_address_static_source_is_a_bare_address() -> None:
    cmds = render_table(
        parse_config(
            DEFAULT + '[static_sources]\nagent = ["192.0.2.7/32", "2001:db8::7/128"]\n'
        ).firewall
    )
    assert static_elems(cmds, "static4_agent") == ["192.0.2.7"]
    assert static_elems(cmds, "static6_agent") == ["2001:db8::7"]


def test_empty_static_sets_exist_and_are_flushed_without_elements() -> None:
    cmds = render_table(cfg_of("default").firewall)
    assert {"static4_agent", "static6_agent"} <= set(named(cmds, "add", "set"))
    assert {"static4_agent", "static6_agent"} <= set(named(cmds, "flush", "set"))
    assert objects(cmds, "add", "element") == []


# --- guarded ports --------------------------------------------------------------------------


def test_guard_chains_exist_only_when_sources_are_configured() -> None:
    plain = render_table(cfg_of("default").firewall)
    assert not any(n.startswith("guard") for n in named(plain, "add", "chain"))
    assert not any(n.startswith("guard") for n in named(plain, "add", "set"))

    cmds = render_table(cfg_of("custom").firewall)
    chains = named(cmds, "add", "chain")
    assert {"guard_api", "guard_metrics"} <= set(chains)
    jumps = {
        jump_target(e): dport_ports(e) for e in rules(cmds, "input") if jump_target(e) is not None
    }
    assert jumps["guard_api"] == ("tcp", {7443})
    assert jumps["guard_metrics"] == ("tcp", {9617})
    assert static_elems(cmds, "guard4_api") == [{"prefix": {"addr": "192.0.2.0", "len": 24}}]
    assert static_elems(cmds, "guard6_api") == [{"prefix": {"addr": "2001:db8:ff::", "len": 48}}]
    assert static_elems(cmds, "guard4_metrics") == ["192.0.2.10"]
    assert static_elems(cmds, "guard6_metrics") == []
    for guard in ("api", "metrics"):
        assert rules(cmds, f"guard_{guard}")[-1][-1] == {"drop": None}


# --- determinism and idempotence ------------------------------------------------------------


def test_render_is_deterministic(fw: FirewallConfig) -> None:
    assert render_table(fw) == render_table(fw)
    assert encode_commands(render_table(fw)) == encode_commands(render_table(fw))


def test_encoded_batch_is_the_command_list_as_json(fw: FirewallConfig) -> None:
    assert json.loads(encode_commands(render_table(fw))) == {"nftables": render_table(fw)}


def test_repeated_install_is_idempotent_by_construction(fw: FirewallConfig) -> None:
    # `add` of an existing table/set/chain/counter is a no-op; so the batch may be applied again
    # only if every chain is flushed before its rules are added and every static set before its
    # elements, all in the same batch.
    flushed: set[tuple[str, str]] = set()
    for cmd in render_table(fw):
        verb, kind, obj = verb_and_object(cmd)
        if verb == "flush":
            flushed.add((kind, obj["name"]))
        elif kind == "rule":
            assert ("chain", obj["chain"]) in flushed, cmd
        elif kind == "element":
            assert ("set", obj["name"]) in flushed, cmd


# --- element comments -----------------------------------------------------------------------

RID64 = "r" * 32 + "-" * 16 + "_" * 8 + "0123456A"


@pytest.mark.parametrize(
    ("subject", "request_id", "local", "comment"),
    [
        ("bob", "r1", False, "req=r1 sub=bob"),
        ("bob", "r1", True, "local req=r1 sub=bob"),
        ("", "req-0001", False, "req=req-0001 sub="),
        ('O\'Brien; "x"', "abcdefgh", False, 'req=abcdefgh sub=O\'Brien; "x"'),
        ("\u00e9l\u00e8ve", "abcdefgh", True, "local req=abcdefgh sub=\u00e9l\u00e8ve"),
    ],
)
def test_short_comment_names_subject_and_request(
    subject: str, request_id: str, local: bool, comment: str
) -> None:
    assert element_comment(subject, request_id, local=local) == comment


def test_comment_of_exactly_128_bytes_is_kept_and_129_is_cut() -> None:
    head = "req=abcdefgh sub="
    fits = "a" * (128 - len(head))
    assert element_comment(fits, "abcdefgh") == head + fits
    over = element_comment(fits + "b", "abcdefgh")
    assert over == head + fits[:-1] + "~"
    assert len(over.encode()) == 128


LONG_SUBJECTS = [
    "a" * 64,
    "\u00e9" * 64,  # 2 bytes each
    "\u4e2d" * 64,  # 3 bytes each
    "\U0001f600" * 64,  # 4 bytes each
    "a\U0001f600" * 32,  # mixed widths, every split offset
    "ab\u4e2d" * 21 + "c",
]


@pytest.mark.parametrize("subject", LONG_SUBJECTS)
@pytest.mark.parametrize("request_id", ["abcdefgh", RID64, RID64[:63]])
@pytest.mark.parametrize("local", [False, True])
def test_long_comment_is_cut_to_128_bytes_on_a_character_boundary(
    subject: str, request_id: str, local: bool
) -> None:
    assert_comment_rule(subject, request_id, local)


def assert_comment_rule(subject: str, request_id: str, local: bool) -> None:
    full = ("local " if local else "") + f"req={request_id} sub={subject}"
    comment = element_comment(subject, request_id, local=local)
    size = len(comment.encode("utf-8"))  # raises if a character was split into a surrogate
    assert size <= ELEMENT_COMMENT_MAX_BYTES
    if len(full.encode()) <= ELEMENT_COMMENT_MAX_BYTES:
        assert comment == full
        return
    assert comment.endswith("~")
    kept = comment[:-1]
    assert full.startswith(kept)
    # nothing more than the partial character at the cut was dropped
    assert len(kept.encode()) > ELEMENT_COMMENT_MAX_BYTES - 1 - 4
    assert comment.startswith(("local " if local else "") + f"req={request_id} sub=")
    Element(EntryKey("agent", Address("8.8.8.8")), 60, comment)  # the value type agrees


SUBJECT_CHARS = st.characters(blacklist_categories=("Cs", "Cc", "Cf", "Zl", "Zp"))


@settings(max_examples=400, deadline=None)
@given(
    subject=st.text(SUBJECT_CHARS, max_size=64),
    request_id=st.from_regex(r"[A-Za-z0-9_-]{8,64}", fullmatch=True),
    local=st.booleans(),
)
def test_any_valid_subject_and_request_id_give_a_comment_within_128_bytes(
    subject: str, request_id: str, local: bool
) -> None:
    assert_comment_rule(subject, request_id, local)


# --- element batches ------------------------------------------------------------------------

A4 = Address("198.18.0.1")
B4 = Address("198.18.0.2")
A6 = Address("2001:db8:1:2::/64")
B6 = Address("2001:db8::5")


def value_error(call: Callable[..., object], *args: object, **kwargs: object) -> ValueError:
    """Programmer errors are plain ValueErrors without a reason word; STYLE.md forbids matching
    their text, so the exact type is what is pinned."""
    with pytest.raises(ValueError) as info:  # noqa: PT011
        call(*args, **kwargs)
    assert type(info.value) is ValueError
    return info.value


def el(profile: str, address: Address, timeout: int = 60, comment: str = "c") -> Element:
    return Element(EntryKey(profile, address), timeout, comment)


def batch(**kwargs: Any) -> list[Command]:
    doc = json.loads(encode_element_batch("vicifast", **kwargs))
    assert list(doc) == ["nftables"]
    cmds: list[Command] = doc["nftables"]
    return cmds


def test_empty_batch_is_an_empty_command_list() -> None:
    assert batch() == []


def test_create_batch_has_one_command_per_profile_and_family_set() -> None:
    cmds = batch(creates=[el("agent", A4), el("agent", A6, 120), el("admin", B4), el("agent", B4)])
    assert cmds == [
        {
            "create": {
                "element": {
                    "family": "inet",
                    "table": "vicifast",
                    "name": "allow4_agent",
                    "elem": [
                        {"elem": {"val": "198.18.0.1", "timeout": 60, "comment": "c"}},
                        {"elem": {"val": "198.18.0.2", "timeout": 60, "comment": "c"}},
                    ],
                }
            }
        },
        {
            "create": {
                "element": {
                    "family": "inet",
                    "table": "vicifast",
                    "name": "allow6_agent",
                    # a /64 entry is stored as its network address
                    "elem": [{"elem": {"val": "2001:db8:1:2::", "timeout": 120, "comment": "c"}}],
                }
            }
        },
        {
            "create": {
                "element": {
                    "family": "inet",
                    "table": "vicifast",
                    "name": "allow4_admin",
                    "elem": [{"elem": {"val": "198.18.0.2", "timeout": 60, "comment": "c"}}],
                }
            }
        },
    ]


def test_deletes_come_before_creates() -> None:
    cmds = batch(
        deletes=[EntryKey("agent", B4), EntryKey("agent", B6)],
        creates=[el("agent", A4), el("agent", A6)],
    )
    assert [next(iter(c)) for c in cmds] == ["delete", "delete", "create", "create"]
    assert cmds[0]["delete"]["element"] == {
        "family": "inet",
        "table": "vicifast",
        "name": "allow4_agent",
        "elem": ["198.18.0.2"],
    }
    assert cmds[1]["delete"]["element"]["name"] == "allow6_agent"
    assert cmds[1]["delete"]["element"]["elem"] == ["2001:db8::5"]


def test_destroy_replaces_delete_when_the_kernel_supports_it() -> None:
    cmds = batch(deletes=[EntryKey("agent", A4)], destroy=True)
    assert cmds == [
        {
            "destroy": {
                "element": {
                    "family": "inet",
                    "table": "vicifast",
                    "name": "allow4_agent",
                    "elem": ["198.18.0.1"],
                }
            }
        }
    ]


def test_refresh_is_delete_and_create_of_the_same_key_in_one_batch() -> None:
    fresh = el("agent", A6, 3600, "req=r2 sub=bob")
    plan = plan_changes([fresh], [], present={fresh.key})
    cmds = batch(deletes=plan.deletes, creates=plan.creates)
    assert cmds == [
        {
            "delete": {
                "element": {
                    "family": "inet",
                    "table": "vicifast",
                    "name": "allow6_agent",
                    "elem": ["2001:db8:1:2::"],
                }
            }
        },
        {
            "create": {
                "element": {
                    "family": "inet",
                    "table": "vicifast",
                    "name": "allow6_agent",
                    "elem": [
                        {
                            "elem": {
                                "val": "2001:db8:1:2::",
                                "timeout": 3600,
                                "comment": "req=r2 sub=bob",
                            }
                        }
                    ],
                }
            }
        },
    ]


@pytest.mark.parametrize(
    "subject",
    [
        'a"b',
        "back\\slash",
        "x;flush ruleset",
        'x"}]}},{"flush":{"ruleset":null}},{"x":{"y":"',
        "}]}",
        "O'Brien",
        "\\u0022",
        "\u00e9\U0001f600\u4e2d",
    ],
)
def test_subject_round_trips_literally_and_cannot_inject_commands(subject: str) -> None:
    comment = element_comment(subject, "abcdefgh")
    cmds = batch(deletes=[EntryKey("agent", B4)], creates=[el("agent", A4, 60, comment)])
    assert [next(iter(c)) for c in cmds] == ["delete", "create"]
    (created,) = cmds[1]["create"]["element"]["elem"]
    assert created == {"elem": {"val": "198.18.0.1", "timeout": 60, "comment": comment}}
    assert created["elem"]["comment"] == "req=abcdefgh sub=" + subject


# --- the element value type -----------------------------------------------------------------


@pytest.mark.parametrize(
    "comment", ["", "a" * 128, "\u00e9" * 64, "\U0001f600" * 32, "a" * 124 + "\U0001f600"]
)
def test_element_accepts_comments_up_to_128_bytes(comment: str) -> None:
    assert el("agent", A4, 60, comment).comment == comment


@pytest.mark.parametrize(
    "comment", ["a" * 129, "\u00e9" * 65, "\U0001f600" * 33, "a" * 125 + "\U0001f600"]
)
def test_element_refuses_a_comment_over_128_bytes(comment: str) -> None:
    value_error(el, "agent", A4, 60, comment)


@pytest.mark.parametrize("timeout", [0, -1, -60])
def test_element_refuses_a_non_positive_timeout(timeout: int) -> None:
    value_error(el, "agent", A4, timeout)
