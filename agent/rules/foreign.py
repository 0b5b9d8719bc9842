"""Pure: what another table's base chain on the input hook does with a new inbound packet.

Owns the one evaluator of other tables' chains (firewalld, ufw, iptables-nft, fail2ban, Debian's
nftables.conf), from their libnftables JSON rules and named sets: ``why`` asks it about one
packet, ``shadowing`` about every protected port for any allowed source. It does no I/O and
never judges the agent's own table.

The evaluation is deliberately partial and says so: it understands the matches such tables use
for a new inbound packet (l4proto, ports, source address, ``iif lo``, ct state and direction,
nfproto), looks values up in the table's named sets (fail2ban's banned addresses, firewalld's
and ufw's address and port sets: their elements, prefixes, ranges and timeouts, as read from the
kernel) and follows jumps and gotos; any other expression (a set that was not read, vmaps,
``xt`` matches of iptables-nft, limits) counts as "may match", so the answer is ``MAY_DROP``
rather than a guess. An accept in one base chain never overrides a drop in another, so every
chain is judged on its own.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_MAX_DEPTH = 16
_L4 = {"tcp": 6, "udp": 17}
_TERMINAL_STATEMENTS = frozenset({"accept", "drop", "reject", "jump", "goto", "return", "queue"})
# Statements that neither match nor end the rule.
_SIDE_EFFECTS = frozenset({"counter", "log", "mangle", "notrack", "ct count", "set", "meter"})


@dataclass(frozen=True, slots=True)
class Packet:
    """A new inbound packet; ``source`` None means "some remote address" (doctor's probes)."""

    family: int
    port: int
    protocol: str
    source: IPAddress | None = None

    def __post_init__(self) -> None:
        if self.family not in (4, 6) or self.protocol not in _L4 or not 1 <= self.port <= 65535:
            raise ValueError(f"bad packet {self}")
        if self.source is not None and self.source.version != self.family:
            raise ValueError("source family differs from the packet's family")

    def __str__(self) -> str:
        src = str(self.source) if self.source else f"any IPv{self.family} source"
        return f"{self.protocol}/{self.port} from {src}"


@dataclass(frozen=True, slots=True, order=True)
class ChainRef:
    family: str
    table: str
    name: str

    def __str__(self) -> str:
        return f"{self.family} {self.table} {self.name}"


@dataclass(frozen=True, slots=True)
class BaseChain:
    ref: ChainRef
    hook: str
    priority: int
    policy: str


class ChainOutcome(enum.Enum):
    ACCEPTS = "accepts"
    DROPS = "drops"
    MAY_DROP = "may_drop"


@dataclass(frozen=True, slots=True)
class ChainFinding:
    chain: BaseChain
    outcome: ChainOutcome
    reason: str
    # What the chain does when none of the rules it cannot judge matches ("accept" or "drop"),
    # and whether its policy decided: shadowing's question, asked for any allowed source.
    settled: str = "accept"
    by_policy: bool = False


@dataclass(frozen=True, slots=True)
class SetElement:
    """One element of a named set: its value as libnftables writes it (an address, a port, a
    ``prefix`` or a ``range``), and when it times out (Unix seconds; None: never)."""

    value: Any
    expires_at_s: float | None = None

    def live(self, now_s: float) -> bool:
        return self.expires_at_s is None or now_s < self.expires_at_s


@dataclass(frozen=True, slots=True)
class NamedSet:
    """A named set of another table, as the kernel listed it (expired elements are not listed;
    one that times out before the evaluation's ``now`` no longer matches either)."""

    ref: ChainRef  # family, table and the set's name
    elements: tuple[SetElement, ...] = ()


def named_set(item: Mapping[str, Any], read_at_s: float) -> NamedSet:
    """A ``list set`` answer's set, each element's ``expires`` made a time. libnftables gives
    the time left in whole seconds, rounded down, and lists only live elements, so one listed
    with ``expires`` 0 still lives: an element counts until a second past its rounded end."""
    s = item.get("set", item)
    elements = []
    for raw in s.get("elem", ()):
        if isinstance(raw, dict) and isinstance(raw.get("elem"), dict):
            inner = raw["elem"]
            expires = inner.get("expires")
            at = read_at_s + expires + 1 if isinstance(expires, int | float) else None
            elements.append(SetElement(inner.get("val"), at))
        else:
            elements.append(SetElement(raw))
    return NamedSet(ChainRef(str(s["family"]), str(s["table"]), str(s["name"])), tuple(elements))


@dataclass(frozen=True, slots=True)
class RulesetView:
    """Other tables' input base chains, the rules of every chain the reader fetched, and the
    named sets those rules look up; ``read_at_s`` is when (Unix seconds)."""

    base_chains: tuple[BaseChain, ...] = ()
    rules: Mapping[ChainRef, tuple[tuple[int, tuple[Any, ...]], ...]] = field(default_factory=dict)
    sets: Mapping[ChainRef, NamedSet] = field(default_factory=dict)
    read_at_s: float = 0.0


def input_base_chains(chains: Iterable[Mapping[str, Any]], own_table: str) -> list[BaseChain]:
    """Base chains on the input hook from a ``list chains`` answer, ours excluded."""
    out = []
    for item in chains:
        c = item.get("chain", item)
        if c.get("hook") != "input" or c.get("family") not in ("ip", "ip6", "inet"):
            continue
        if c.get("family") == "inet" and c.get("table") == own_table:
            continue
        ref = ChainRef(str(c["family"]), str(c["table"]), str(c["name"]))
        out.append(BaseChain(ref, "input", int(c.get("prio", 0)), str(c.get("policy", "accept"))))
    return sorted(out, key=lambda b: (b.priority, b.ref))


def rules_by_chain(
    items: Iterable[Mapping[str, Any]],
) -> dict[ChainRef, tuple[tuple[int, tuple[Any, ...]], ...]]:
    """Group a ``list chain`` answer's rules as (handle, expressions) per chain, in order."""
    out: dict[ChainRef, list[tuple[int, tuple[Any, ...]]]] = {}
    for item in items:
        if "chain" in item:
            c = item["chain"]
            out.setdefault(ChainRef(c["family"], c["table"], c["name"]), [])
        r = item.get("rule")
        if r:
            ref = ChainRef(r["family"], r["table"], r["chain"])
            out.setdefault(ref, []).append((int(r.get("handle", 0)), tuple(r.get("expr", ()))))
    return {k: tuple(v) for k, v in out.items()}


def set_references(rules: Iterable[tuple[int, tuple[Any, ...]]]) -> set[str]:
    """Names of the named sets the given rules' matches look values up in (``@name``)."""
    names = set()
    for _, exprs in rules:
        for e in exprs:
            if isinstance(e, dict) and isinstance(e.get("match"), dict):
                right = e["match"].get("right")
                if isinstance(right, str) and right.startswith("@"):
                    names.add(right[1:])
    return names


def jump_targets(rules: Iterable[tuple[int, tuple[Any, ...]]]) -> set[str]:
    """Names of the chains the given rules jump or go to."""
    names = set()
    for _, exprs in rules:
        for e in exprs:
            for verb in ("jump", "goto"):
                if isinstance(e, dict) and isinstance(e.get(verb), dict):
                    names.add(str(e[verb]["target"]))
    return names


def applies_to(chain: BaseChain, family: int) -> bool:
    return chain.ref.family in ("inet", "ip" if family == 4 else "ip6")


# Tri-state matching: True (matches), False (cannot match), None (cannot tell).
Tri = bool | None


def _any(results: Iterable[Tri]) -> Tri:
    seen = list(results)
    if any(r is True for r in seen):
        return True
    return None if any(r is None for r in seen) else False


def _in_range(bounds: Sequence[Any], value: Any, compare: Any) -> Tri:
    lo, hi = (compare(b) for b in bounds)
    if lo is None or hi is None or value is None:
        return None
    if not type(lo) is type(hi) is type(value):
        return False  # an IPv4 range never holds an IPv6 address
    return bool(lo <= value <= hi)


def _in_prefix(prefix: Mapping[str, Any], value: Any) -> Tri:
    try:
        net = ipaddress.ip_network(f"{prefix['addr']}/{prefix['len']}", strict=False)
    except (ValueError, KeyError):
        return None
    if not isinstance(value, IPAddress):
        return None
    return net.version == value.version and value in net


# Looks a named set of the rule's table up by name; None when it was not read.
SetLookup = Callable[[str], NamedSet | None]


def _no_sets(name: str) -> NamedSet | None:
    return None


@dataclass(frozen=True, slots=True)
class _Scope:
    """What a rule's matches are judged against: the packet, the sets of the rule's table."""

    packet: Packet
    lookup: SetLookup = _no_sets
    now_s: float = 0.0


def _scalar_matches(right: Any, value: Any, compare: Any, scope: _Scope) -> Tri:
    """Does ``value`` equal (or lie in) the rule's right-hand side?"""
    if isinstance(right, list):
        right = {"set": right}
    if isinstance(right, dict):
        return _in_structure(right, value, compare, scope)
    if isinstance(right, str) and right.startswith("@"):
        return _in_named_set(right[1:], value, compare, scope)
    expected = compare(right)
    if expected is None or value is None:
        return None  # an unknown source, or a value of a kind not understood
    return bool(expected == value)


def _in_structure(right: Mapping[str, Any], value: Any, compare: Any, scope: _Scope) -> Tri:
    """An anonymous set, a range or a prefix."""
    if "set" in right:
        return _any(_scalar_matches(r, value, compare, scope) for r in right["set"])
    if "range" in right:
        return _in_range(right["range"], value, compare)
    if "prefix" in right:
        return _in_prefix(right["prefix"], value)
    return None


def _in_named_set(name: str, value: Any, compare: Any, scope: _Scope) -> Tri:
    named = scope.lookup(name)
    if named is None or value is None:
        return None  # a set that was not read, or an unknown source
    live = [e.value for e in named.elements if e.live(scope.now_s)]
    return _any(_scalar_matches(v, value, compare, scope) for v in live)


def _port(v: Any) -> int | None:
    return v if isinstance(v, int) else (int(v) if isinstance(v, str) and v.isdigit() else None)


def _addr(v: Any) -> IPAddress | None:
    try:
        return ipaddress.ip_address(v) if isinstance(v, str) else None
    except ValueError:
        return None


def _l4(v: Any) -> int | None:
    if isinstance(v, int):
        return v
    return _L4.get(v) if isinstance(v, str) else None


def _word(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def _header_absent(payload: Mapping[str, Any], packet: Packet) -> bool:
    """``tcp dport != 22`` still means "is TCP": a header the packet lacks never matches."""
    proto = str(payload.get("protocol"))
    if proto in ("tcp", "udp"):
        return proto != packet.protocol
    return proto in ("ip", "ip6") and (proto == "ip") != (packet.family == 4)


def _payload_match(payload: Mapping[str, Any], right: Any, scope: _Scope) -> Tri:
    proto, fld = payload.get("protocol"), payload.get("field")
    packet = scope.packet
    if proto in ("tcp", "udp", "th") and fld == "dport":
        return _scalar_matches(right, packet.port, _port, scope)
    if proto in ("ip", "ip6") and fld == "saddr":
        return _scalar_matches(right, packet.source, _addr, scope)
    if (proto, fld) in (("ip", "protocol"), ("ip6", "nexthdr")):
        return _scalar_matches(right, _L4[packet.protocol], _l4, scope)
    return None


def _meta_match(key: Any, right: Any, scope: _Scope) -> Tri:
    packet = scope.packet
    if key == "l4proto":
        return _scalar_matches(right, _L4[packet.protocol], _l4, scope)
    if key == "nfproto":
        return _scalar_matches(right, f"ipv{packet.family}", _word, scope)
    # A remote's packet does not arrive on lo; any other interface name is unknown.
    if key in ("iifname", "iif") and _scalar_matches(right, "lo", _word, scope) is True:
        return False
    return None


def _ct_match(key: Any, right: Any, scope: _Scope) -> Tri:
    if key == "state":
        return _scalar_matches(right, "new", _word, scope)
    if key == "direction":
        return _scalar_matches(right, "original", _word, scope)
    return None


def _match(m: Mapping[str, Any], scope: _Scope) -> Tri:
    left, right, op = m.get("left"), m.get("right"), m.get("op", "==")
    result: Tri = None
    if isinstance(left, dict) and "payload" in left:
        if _header_absent(left["payload"], scope.packet):
            return False
        result = _payload_match(left["payload"], right, scope)
    elif isinstance(left, dict) and "meta" in left:
        result = _meta_match(left["meta"].get("key"), right, scope)
    elif isinstance(left, dict) and "ct" in left:
        result = _ct_match(left["ct"].get("key"), right, scope)
    if result is None or op not in ("==", "!=", "in"):
        return None
    return (not result) if op == "!=" else result


@dataclass(slots=True)
class _Walk:
    verdict: str = "fallthrough"  # accept | drop | fallthrough
    reason: str = ""
    doubts: list[str] = field(default_factory=list)  # rules that may drop it
    maybe_accepted: bool = False


def _rule_verdict(exprs: Sequence[Any], scope: _Scope) -> tuple[Tri, Any]:
    """(do the rule's matches hold, its terminal statement or None)."""
    holds: Tri = True
    for e in exprs:
        if not isinstance(e, dict) or not e:
            return None, None
        kind = next(iter(e))
        if kind == "match":
            m = _match(e["match"], scope)
            if m is False:
                return False, None
            if m is None:
                holds = None
        elif kind in _TERMINAL_STATEMENTS or kind == "vmap":
            return holds, e
        elif kind not in _SIDE_EFFECTS:
            holds = None  # limit, quota, xt, ...: cannot tell
    return holds, None


def _walk(view: RulesetView, ref: ChainRef, packet: Packet, now_s: float, depth: int) -> _Walk:
    walk = _Walk()
    rules = view.rules.get(ref)
    if rules is None or depth > _MAX_DEPTH:
        walk.doubts.append(f"chain {ref.name} was not read")
        walk.maybe_accepted = True
        return walk

    def lookup(name: str) -> NamedSet | None:  # sets are per table, like chains
        return view.sets.get(ChainRef(ref.family, ref.table, name))

    scope = _Scope(packet, lookup, now_s)
    for handle, exprs in rules:
        holds, stmt = _rule_verdict(exprs, scope)
        if holds is False or stmt is None:
            continue
        verb = next(iter(stmt))
        if verb in ("jump", "goto"):
            target = ChainRef(ref.family, ref.table, stmt[verb]["target"])
            if _follow(walk, _walk(view, target, packet, now_s, depth + 1), holds, verb):
                return walk
        elif verb == "return":
            if holds is True:
                return walk
        elif _verdict(walk, verb, holds, f"rule handle {handle} of chain {ref.name}"):
            return walk
    return walk


def _follow(walk: _Walk, sub: _Walk, holds: Tri, verb: str) -> bool:
    """Fold a jumped-to chain's walk into ``walk``; True when the packet's fate is decided."""
    if holds is None:
        if sub.verdict == "drop":
            walk.doubts.append(sub.reason)
        walk.doubts += sub.doubts
        walk.maybe_accepted |= sub.verdict == "accept" or sub.maybe_accepted
        return False
    walk.doubts += sub.doubts
    walk.maybe_accepted |= sub.maybe_accepted
    if sub.verdict != "fallthrough":
        walk.verdict, walk.reason = sub.verdict, sub.reason
        return True
    return verb == "goto"  # after a goto's chain ends, the calling chain does not resume


def _verdict(walk: _Walk, verb: str, holds: Tri, where: str) -> bool:
    outcome = {"accept": "accept", "drop": "drop", "reject": "drop"}.get(verb)
    if outcome is None:  # queue, vmap: something else decides
        walk.doubts.append(f"{where} hands the packet to {verb}")
        walk.maybe_accepted = True
        return False
    if holds is None:
        if outcome == "drop":
            walk.doubts.append(f"{where} ({verb}) may match")
        else:
            walk.maybe_accepted = True
        return False
    walk.verdict = outcome
    walk.reason = f"{where} {'accepts' if outcome == 'accept' else verb + 's'} it"
    return True


def evaluate_chain(
    view: RulesetView, chain: BaseChain, packet: Packet, *, now_s: float | None = None
) -> ChainFinding:
    """What ``chain`` does with ``packet``: accepts, drops, or may drop (and why). Set elements
    count while they live at ``now_s`` (default: when the view was read)."""
    now = view.read_at_s if now_s is None else now_s
    walk = _walk(view, chain.ref, packet, now, 0)
    by_policy = walk.verdict == "fallthrough"
    if by_policy:
        walk.verdict = "drop" if chain.policy == "drop" else "accept"
        walk.reason = f"no rule decides, so the chain's policy {chain.policy} applies"
    if walk.verdict == "accept" and not walk.doubts:
        outcome, why = ChainOutcome.ACCEPTS, walk.reason
    elif walk.verdict == "accept":
        outcome, why = ChainOutcome.MAY_DROP, "; ".join(walk.doubts)
    elif walk.maybe_accepted:
        outcome, why = ChainOutcome.MAY_DROP, f"{walk.reason} unless an uncertain rule accepts it"
    else:
        outcome, why = ChainOutcome.DROPS, walk.reason
    return ChainFinding(chain, outcome, why, settled=walk.verdict, by_policy=by_policy)
