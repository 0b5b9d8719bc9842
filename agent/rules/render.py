"""Pure: configuration and entries -> libnftables JSON commands for the agent's own table.

Owns the shape of the table (RULESET.md). Never performs I/O and never emits a command that names
anything outside ``inet <table>``: no ``flush ruleset``, no other table.

The table, for each profile P with protected ports and the agent's guarded ports::

    chain input   (filter hook input, priority filter-10, policy accept)
        iif lo accept                       loopback is never touched
        ct direction reply accept           replies to connections the host initiated
        tcp dport <guarded> jump guard_<g>  gRPC / metrics ports, only when sources are set
        tcp|udp dport <P ports> jump prof_P
    chain prof_P
        ip saddr @allow4_P accept           dynamic entries, per-element timeouts
        ip6 saddr [& /64 mask] @allow6_P accept
        ip saddr @static4_P accept          static sources from config
        ip6 saddr @static6_P accept
        limit ... log                       rate-limited log of drops
        counter name drop_P drop

An original-direction packet from a remote is judged by the sets every time: there is no
``ct state established accept`` shortcut, so a revoked source's next packet is dropped.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Iterator, Sequence
from json.encoder import encode_basestring_ascii
from typing import Any

from agent.config import FirewallConfig, GuardedPort, IPNetwork, PortRange, Profile
from agent.model import ELEMENT_COMMENT_MAX_BYTES, Address, Element, EntryKey

FAMILY = "inet"
INPUT_CHAIN = "input"
IPV6_64_MASK = "ffff:ffff:ffff:ffff::"

Command = dict[str, Any]


def allow_set(profile: str, family: int) -> str:
    return f"allow{family}_{profile}"


def static_set(profile: str, family: int) -> str:
    return f"static{family}_{profile}"


def guard_set(guard: str, family: int) -> str:
    return f"guard{family}_{guard}"


def profile_chain(profile: str) -> str:
    return f"prof_{profile}"


def guard_chain(guard: str) -> str:
    return f"guard_{guard}"


def drop_counter(profile: str) -> str:
    return f"drop_{profile}"


def element_comment(subject: str, request_id: str, *, local: bool = False) -> str:
    """The element comment a sysadmin reads in ``nft list``: at most 128 bytes of UTF-8.

    libnftables' JSON path does not check comment length (253 bytes are silently dropped, 254+
    make it call exit() in our process), so the cut happens here, on a character boundary.
    The full subject and request id live in the agent's own state.
    """
    head = ("local " if local else "") + f"req={request_id} sub="
    text = head + subject
    if text.isascii() and len(text) <= ELEMENT_COMMENT_MAX_BYTES:
        return text  # one byte per character: no need to encode to count (100,000 at restore)
    raw = text.encode()
    if len(raw) <= ELEMENT_COMMENT_MAX_BYTES:
        return text
    cut = raw[: ELEMENT_COMMENT_MAX_BYTES - 1].decode("utf-8", errors="ignore")
    return cut + "~"


def _obj(kind: str, table: str, **fields: Any) -> Command:
    return {kind: {"family": FAMILY, "table": table, **fields}}


def _rule(table: str, chain: str, *expr: Command) -> Command:
    return {"add": _obj("rule", table, chain=chain, expr=list(expr))}


def _match(left: Any, right: Any) -> Command:
    return {"match": {"op": "==", "left": left, "right": right}}


def _payload(protocol: str, field: str) -> Command:
    return {"payload": {"protocol": protocol, "field": field}}


_ACCEPT: Command = {"accept": None}


def _port_set(ports: Iterable[PortRange]) -> dict[str, list[Any]]:
    items: list[Any] = []
    for p in sorted(ports):
        items.append(p.first if p.first == p.last else {"range": [p.first, p.last]})
    return {"set": items}


def _prefix(net: IPNetwork) -> Any:
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _networks(nets: Iterable[IPNetwork], family: int) -> list[Any]:
    # The kernel refuses overlapping intervals even with auto-merge, so collapse them here.
    nets = list(nets)
    merged: list[IPNetwork] = []
    if family == 4:
        merged += ipaddress.collapse_addresses(
            n for n in nets if isinstance(n, ipaddress.IPv4Network)
        )
    else:
        merged += ipaddress.collapse_addresses(
            n for n in nets if isinstance(n, ipaddress.IPv6Network)
        )
    return [_prefix(n) for n in merged]


def _interval_set(table: str, name: str, family: int, nets: Iterable[IPNetwork]) -> list[Command]:
    cmds: list[Command] = [
        {"add": _obj("set", table, name=name, type=f"ipv{family}_addr", flags=["interval"])},
        {"flush": _obj("set", table, name=name)},
    ]
    elems = _networks(nets, family)
    if elems:
        cmds.append({"add": _obj("element", table, name=name, elem=elems)})
    return cmds


def _saddr(family: int) -> Command:
    return _payload("ip" if family == 4 else "ip6", "saddr")


def _allow6_key(cfg: FirewallConfig) -> Any:
    # Under the /64 policy the set holds /64 network addresses; the lookup masks the source.
    if cfg.ipv6_prefix == 64:
        return {"&": [_saddr(6), IPV6_64_MASK]}
    return _saddr(6)


def _profile_commands(cfg: FirewallConfig, prof: Profile) -> list[Command]:
    t = cfg.table
    chain = profile_chain(prof.name)
    cmds: list[Command] = [{"add": _obj("counter", t, name=drop_counter(prof.name))}]
    for family, size in ((4, cfg.set_size_ipv4), (6, cfg.set_size_ipv6)):
        cmds.append(
            {
                "add": _obj(
                    "set",
                    t,
                    name=allow_set(prof.name, family),
                    type=f"ipv{family}_addr",
                    flags=["timeout"],
                    size=size,
                )
            }
        )
        cmds += _interval_set(t, static_set(prof.name, family), family, prof.static_sources)
    cmds += [
        {"add": _obj("chain", t, name=chain)},
        {"flush": _obj("chain", t, name=chain)},
        _rule(t, chain, _match(_saddr(4), "@" + allow_set(prof.name, 4)), _ACCEPT),
        _rule(t, chain, _match(_allow6_key(cfg), "@" + allow_set(prof.name, 6)), _ACCEPT),
        _rule(t, chain, _match(_saddr(4), "@" + static_set(prof.name, 4)), _ACCEPT),
        _rule(t, chain, _match(_saddr(6), "@" + static_set(prof.name, 6)), _ACCEPT),
    ]
    if cfg.log_drops:
        cmds.append(
            _rule(
                t,
                chain,
                {"limit": {"rate": cfg.log_rate_per_minute, "per": "minute"}},
                {"log": {"prefix": f"vicifast-agent drop {prof.name}: ", "level": "info"}},
            )
        )
    cmds.append(_rule(t, chain, {"counter": drop_counter(prof.name)}, {"drop": None}))
    return cmds


def _guard_commands(cfg: FirewallConfig, guard: GuardedPort) -> list[Command]:
    t = cfg.table
    chain = guard_chain(guard.name)
    cmds: list[Command] = []
    for family in (4, 6):
        cmds += _interval_set(t, guard_set(guard.name, family), family, guard.sources)
    cmds += [
        {"add": _obj("chain", t, name=chain)},
        {"flush": _obj("chain", t, name=chain)},
        _rule(t, chain, _match(_saddr(4), "@" + guard_set(guard.name, 4)), _ACCEPT),
        _rule(t, chain, _match(_saddr(6), "@" + guard_set(guard.name, 6)), _ACCEPT),
        _rule(t, chain, {"counter": None}, {"drop": None}),
    ]
    return cmds


def render_table(cfg: FirewallConfig) -> list[Command]:
    """The whole table's structure as one batch, idempotent and preserving dynamic elements.

    ``add`` of an existing table/set/chain is a no-op, chains and static sets are flushed and
    refilled in the same transaction, and the dynamic allow sets are never flushed: applying
    this to a live table repairs its rules without touching a single allow entry.
    """
    t = cfg.table
    cmds: list[Command] = [{"add": {"table": {"family": FAMILY, "name": t}}}]
    for prof in cfg.profiles:
        cmds += _profile_commands(cfg, prof)
    for guard in cfg.guarded_ports:
        cmds += _guard_commands(cfg, guard)
    cmds += [
        {
            "add": _obj(
                "chain",
                t,
                name=INPUT_CHAIN,
                type="filter",
                hook="input",
                prio=cfg.chain_priority,
                policy="accept",
            )
        },
        {"flush": _obj("chain", t, name=INPUT_CHAIN)},
        _rule(t, INPUT_CHAIN, _match({"meta": {"key": "iif"}}, "lo"), _ACCEPT),
        _rule(t, INPUT_CHAIN, _match({"ct": {"key": "direction"}}, "reply"), _ACCEPT),
    ]
    for guard in cfg.guarded_ports:
        cmds.append(
            _rule(
                t,
                INPUT_CHAIN,
                _match(_payload("tcp", "dport"), guard.port),
                {"jump": {"target": guard_chain(guard.name)}},
            )
        )
    for prof in cfg.profiles:
        for proto in ("tcp", "udp"):
            ports = [p for p in prof.ports if p.protocol == proto]
            if ports:
                cmds.append(
                    _rule(
                        t,
                        INPUT_CHAIN,
                        _match(_payload(proto, "dport"), _port_set(ports)),
                        {"jump": {"target": profile_chain(prof.name)}},
                    )
                )
    return cmds


def render_delete_table(table: str) -> list[Command]:
    return [{"delete": {"table": {"family": FAMILY, "name": table}}}]


# --- element batches -------------------------------------------------------------------------
# Element lists can hold 100,000 entries. They are encoded straight to JSON text, never built as
# a tree of Python dicts first: that tree, not the kernel, dominates the memory of a large batch.


def _set_ref(table: str, key: EntryKey) -> str:
    return json.dumps(
        {"family": FAMILY, "table": table, "name": allow_set(key.profile, key.address.family)}
    )[1:-1]


def _grouped(items: Iterable[Any], key_of: Any) -> dict[tuple[str, int], list[Any]]:
    groups: dict[tuple[str, int], list[Any]] = {}
    for item in items:
        k: EntryKey = key_of(item)
        groups.setdefault((k.profile, k.address.family), []).append(item)
    return groups


def _json_value(address: Address) -> str:
    # Address.element re-parses the text with ipaddress (~3 us, most of the encode time of a
    # 100k batch); a bare address's normal form already is its element (Address checks that),
    # so only /64 prefixes need it. encode_basestring_ascii is what json.dumps(str) runs, less
    # the encoder set-up around it: the output is the same text.
    text = address.text
    return encode_basestring_ascii(text if "/" not in text else address.element)


def _encode_element(e: Element) -> str:
    return (
        f'{{"elem":{{"val":{_json_value(e.key.address)},'
        f'"timeout":{e.timeout_s},"comment":{encode_basestring_ascii(e.comment)}}}}}'
    )


def _element_commands(
    verb: str, table: str, groups: dict[tuple[str, int], list[Any]], encode: Any
) -> Iterator[str]:
    for items in groups.values():
        ref = _set_ref(table, _key(items[0]))
        body = ",".join(encode(i) for i in items)
        yield f'{{"{verb}":{{"element":{{{ref},"elem":[{body}]}}}}}}'


def _key(item: Element | EntryKey) -> EntryKey:
    return item.key if isinstance(item, Element) else item


def encode_element_batch(
    table: str,
    *,
    deletes: Sequence[EntryKey] = (),
    creates: Sequence[Element] = (),
    destroy: bool = False,
) -> str:
    """One transaction's JSON text: delete ``deletes`` (and refreshed keys), then create.

    ``create`` rather than ``add``: it fails with EEXIST when the element is already there, so a
    wrong belief about the kernel fails the whole batch instead of silently keeping an old
    timeout (Debian 12's kernel ignores a re-add). A refresh is a delete and a create of the same
    key in this one batch.
    """
    parts: list[str] = []
    parts += _element_commands(
        "destroy" if destroy else "delete",
        table,
        _grouped(deletes, _key),
        lambda k: _json_value(k.address),
    )
    parts += _element_commands("create", table, _grouped(creates, _key), _encode_element)
    return '{"nftables":[' + ",".join(parts) + "]}"


def encode_commands(cmds: Sequence[Command]) -> str:
    return json.dumps({"nftables": list(cmds)}, separators=(",", ":"))
