"""The whole of the agent's table but the allow sets' elements: what it must be, what it is, and
the batch that makes it so.

Owns "is everything in the table ours and as we made it?" for start-up, drift repair and the
periodic check. The comparison is pure: ``expected_structure(cfg)`` (from what ``render``
writes) against ``observed_structure(listing, ...)`` (what the kernel lists), giving findings
(``missing_from``) and the objects to remove (``rogue_in``); ``render_repair`` turns them into
one transaction. Compared: every chain (hook, priority, policy), every rule in order, every set
(type, size, flags), every named object (counters, quotas, maps, flowtables ...: anything else
in the table is rogue and removed) and the elements of the interval sets of static sources
(as the address ranges they cover). The allow sets' elements are reconcile's business.

Cheap enough for every check with 100,000 allow elements: a terse ``list ruleset`` of the inet
family (no set elements fetched: ~1 ms in all with 100,000 entries, where nft 1.0.6 fetches
every element for ``list table`` even when terse, ~2.5 s) and one netlink dump per small
interval set. Never changes the table itself.
"""

from __future__ import annotations

import errno
import ipaddress
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from agent.config import FirewallConfig
from agent.errors import KernelError
from agent.rules import render
from agent.rules.monitor import NFT_SET_ELEM_INTERVAL_END, set_element_keys, table_flags
from agent.rules.nft import NftAdapter

_T = TypeVar("_T")
ChainShape = tuple[str, str, int, str]  # name, hook ("" for regular), prio, policy
SetShape = tuple[str, str, int, tuple[str, ...]]  # name, type, size, flags
Ranges = tuple[tuple[int, int], ...]  # merged [first, end) address ranges, ascending
_OBJECT_KINDS = (
    "counter",
    "quota",
    "limit",
    "ct helper",
    "ct timeout",
    "ct expectation",
    "secmark",
    "synproxy",
    "flowtable",
    "map",
)
# The kernel's default burst of a rate limit: listed, though never written.
_DEFAULT_BURST = 5


@dataclass(frozen=True, slots=True)
class Structure:
    chains: frozenset[ChainShape]
    sets: frozenset[SetShape]
    rules: frozenset[tuple[str, tuple[str, ...]]]  # chain, its rules (canonical JSON) in order
    objects: frozenset[tuple[str, str]] = frozenset()  # kind, name of every other object
    ranges: frozenset[tuple[str, Ranges]] = frozenset()  # interval set, what it covers
    flags: int = 0  # the table's (1: dormant, every chain of it off)

    def allow_sets(self) -> frozenset[str]:
        return frozenset(s[0] for s in self.sets if s[0].startswith("allow"))

    def missing_from(self, observed: Structure) -> list[str]:
        """Pure: what ``observed`` lacks, has differently or has besides this expected one.

        Elements of an interval set are compared only when ``observed`` read them.
        """
        out: list[str] = []
        if observed.flags != self.flags:
            out.append("table flags (dormant: every rule of it off)")
        seen_chains = {c[0]: c for c in observed.chains}
        for c in sorted(self.chains):
            if c[0] not in seen_chains:
                out.append(f"chain {c[0]}")
            elif seen_chains[c[0]] != c:
                out.append(f"chain {c[0]} (hook, priority or policy)")
        seen_sets = {s[0]: s for s in observed.sets}
        for s in sorted(self.sets):
            if s[0] not in seen_sets:
                out.append(f"set {s[0]}")
            elif seen_sets[s[0]] != s:
                out.append(f"set {s[0]} (type, size or flags)")
        seen_rules = dict(observed.rules)
        out += [f"rules of {c}" for c, rules in sorted(self.rules) if seen_rules.get(c) != rules]
        out += [f"{k} {n}" for k, n in sorted(self.objects - observed.objects)]
        seen_ranges = dict(observed.ranges)
        out += [
            f"elements of {name}"
            for name, ranges in sorted(self.ranges)
            if name in seen_ranges and seen_ranges[name] != ranges
        ]
        # Rogue: what the agent never makes (what it makes but must make again is named above).
        rogue = self.rogue_in(observed)
        ours = {c[0] for c in self.chains} | {s[0] for s in self.sets}
        out += [f"rogue chain {c}" for c in rogue.chains if c not in ours]
        out += [f"rogue set {s}" for s in rogue.sets if s not in ours]
        out += [f"rogue {k} {n}" for k, n in rogue.objects]
        return out

    def rogue_in(self, observed: Structure) -> Rogue:
        """Pure: what must go from ``observed``, whether the agent never made it (rogue) or it
        cannot be corrected in place (a set's type or flags, a chain's hook or priority)."""
        chains = {c[0]: c for c in self.chains}
        sets = {s[0]: s for s in self.sets}
        return Rogue(
            chains=tuple(
                sorted(
                    c[0] for c in observed.chains if c[0] not in chains or chains[c[0]][:3] != c[:3]
                )
            ),
            sets=tuple(sorted(s[0] for s in observed.sets if sets.get(s[0]) != s)),
            objects=tuple(sorted(observed.objects - self.objects)),
        )


@dataclass(frozen=True, slots=True)
class Rogue:
    """Objects to delete before the table is rendered again (see ``render_repair``)."""

    chains: tuple[str, ...] = ()
    sets: tuple[str, ...] = ()
    objects: tuple[tuple[str, str], ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.chains or self.sets or self.objects)


def _chain(c: Mapping[str, Any]) -> ChainShape:
    return (str(c["name"]), str(c.get("hook", "")), int(c.get("prio", 0)), str(c.get("policy", "")))


def _set(s: Mapping[str, Any]) -> SetShape:
    return (
        str(s["name"]),
        str(s["type"]),
        int(s.get("size", 0)),
        tuple(sorted(s.get("flags", ()))),
    )


def _number_ranges(value: Any) -> list[list[int]] | None:
    """A match's right side of numbers (one, a range, a set of both) as merged ranges; None
    for anything else. nft lists ``{5060, 5061}`` as a range and a one-element set bare."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return [[value, value]]
    if isinstance(value, dict) and len(value) == 1:
        if "range" in value:
            first, last = value["range"]
            if isinstance(first, int) and isinstance(last, int):
                return [[first, last]]
        if "set" in value and isinstance(value["set"], list):
            parts = [_number_ranges(v) for v in value["set"]]
            if all(p is not None for p in parts):
                spans = sorted((a, b + 1) for p in parts if p for a, b in p)
                return [[a, b - 1] for a, b in merged(spans)]
    return None


def _normal_expr(expr: Any) -> Any:
    """An expression as written and as listed alike: counters' running values and a limit's
    default burst are left out, and port lists take one form."""
    if isinstance(expr, dict):
        if "match" in expr and isinstance(expr["match"], dict):
            match = {k: _normal_expr(v) for k, v in expr["match"].items()}
            numbers = _number_ranges(expr["match"].get("right"))
            if numbers is not None:
                match["right"] = {"numbers": numbers}
            return {"match": match}
        if "counter" in expr and isinstance(expr["counter"], dict):
            named = expr["counter"].get("name") if isinstance(expr["counter"], dict) else None
            return {"counter": named}
        if "limit" in expr and isinstance(expr["limit"], dict):
            limit = {k: v for k, v in expr["limit"].items() if k != "burst" or v != _DEFAULT_BURST}
            return {"limit": limit}
        return {k: _normal_expr(v) for k, v in expr.items()}
    if isinstance(expr, list):
        return [_normal_expr(v) for v in expr]
    return expr


def canonical_rule(exprs: Iterable[Any]) -> str:
    """Pure: one rule's expressions as text that equal rules share."""
    return json.dumps([_normal_expr(e) for e in exprs], sort_keys=True, separators=(",", ":"))


def _interval(value: Any) -> tuple[int, int]:
    if isinstance(value, dict) and "prefix" in value:
        net = ipaddress.ip_network(f"{value['prefix']['addr']}/{value['prefix']['len']}")
    else:
        net = ipaddress.ip_network(str(value))
    return int(net.network_address), int(net.broadcast_address) + 1


def merged(ranges: Iterable[tuple[int, int]]) -> Ranges:
    """Pure: ranges sorted, with overlapping and adjacent ones joined."""
    out: list[tuple[int, int]] = []
    for first, end in sorted(ranges):
        if out and first <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((first, end))
    return tuple(out)


def ranges_from_keys(keys: Iterable[tuple[bytes, int]]) -> Ranges:
    """Pure: what an interval set's elements (key, flags), as the kernel dumps them, cover.

    An element without ``NFT_SET_ELEM_INTERVAL_END`` opens a range that the next end element
    (in address order) closes; an end with nothing open (nft writes one at 0.0.0.0) closes
    nothing, and a range still open at the last element runs to the top of the address space.
    """
    ordered = sorted(
        (int.from_bytes(k, "big"), bool(f & NFT_SET_ELEM_INTERVAL_END), len(k))
        for k, f in keys
        if k
    )
    # At one address an end (closing the range below) comes before a start.
    ordered.sort(key=lambda e: (e[0], not e[1]))
    found: list[tuple[int, int]] = []
    opened: int | None = None
    top = 0
    for value, is_end, width in ordered:
        top = max(top, 1 << (8 * width))
        if not is_end and opened is None:
            opened = value
        elif is_end and opened is not None:
            found.append((opened, value))
            opened = None
    if opened is not None:
        found.append((opened, top))
    return merged(found)


def expected_structure(cfg: FirewallConfig) -> Structure:
    """Pure: the structure ``render_table(cfg)`` creates."""
    chains: set[ChainShape] = set()
    sets: set[SetShape] = set()
    objects: set[tuple[str, str]] = set()
    rules: dict[str, list[str]] = {}
    intervals: dict[str, list[tuple[int, int]]] = {}
    for cmd in render.render_table(cfg):
        add = cmd.get("add", {})
        if "chain" in add:
            chains.add(_chain(add["chain"]))
            rules.setdefault(add["chain"]["name"], [])
        elif "set" in add:
            sets.add(_set(add["set"]))
            if "interval" in add["set"].get("flags", ()):
                intervals.setdefault(add["set"]["name"], [])
        elif "rule" in add:
            rules.setdefault(add["rule"]["chain"], []).append(canonical_rule(add["rule"]["expr"]))
        elif "element" in add:
            intervals.setdefault(add["element"]["name"], []).extend(
                _interval(v) for v in add["element"]["elem"]
            )
        elif "counter" in add:
            objects.add(("counter", add["counter"]["name"]))
    return Structure(
        frozenset(chains),
        frozenset(sets),
        frozenset((c, tuple(r)) for c, r in rules.items()),
        frozenset(objects),
        frozenset((name, merged(r)) for name, r in intervals.items()),
    )


def observed_structure(
    items: Iterable[Mapping[str, Any]],
    table: str,
    interval_keys: Mapping[str, Iterable[tuple[bytes, int]]] | None = None,
) -> Structure:
    """Pure: the structure of ``inet <table>`` from a terse listing of its family, with the
    elements of the interval sets that were dumped (``set_element_keys``)."""
    chains, sets, objects = set(), set(), set()
    rules: dict[str, list[str]] = {}
    for item in items:
        for kind, obj in item.items():
            if not isinstance(obj, dict) or obj.get("family") != render.FAMILY:
                continue
            if obj.get("table") != table:
                continue
            if kind == "chain":
                chains.add(_chain(obj))
                rules.setdefault(str(obj["name"]), [])
            elif kind == "set":
                sets.add(_set(obj))
            elif kind == "rule":
                rules.setdefault(str(obj["chain"]), []).append(canonical_rule(obj.get("expr", ())))
            elif kind in _OBJECT_KINDS:
                objects.add((kind, str(obj.get("name", ""))))
    ranges = {name: ranges_from_keys(keys) for name, keys in (interval_keys or {}).items()}
    return Structure(
        frozenset(chains),
        frozenset(sets),
        frozenset((c, tuple(r)) for c, r in rules.items() if c in {ch[0] for ch in chains}),
        frozenset(objects),
        frozenset(ranges.items()),
    )


def read_structure(nft: NftAdapter, table: str, interval_sets: Iterable[str] = ()) -> Structure:
    """The live structure of ``inet <table>`` (empty when the table is absent), with the
    elements of those of ``interval_sets`` that exist.

    A dormant table (``nft add table inet vicifast { flags dormant; }`` switches every chain of
    it off) cannot be listed as JSON by nft 1.0.6; its chains and sets are then read with the
    listings that do not print the table, and its rules are not read: the repair writes them
    all again (and ``render_table``'s ``add table`` wakes the table).

    Raises ``KernelError`` (``unreadable_listing``) when a listing or a netlink dump fails.
    """
    try:
        flags = _netlink(table_flags, table) or 0
        if flags:
            items = nft.query({"list": {"chains": {"family": render.FAMILY}}})
            items += nft.query({"list": {"sets": {"family": render.FAMILY}}}, terse=True)
            live = observed_structure(items, table)
            return Structure(live.chains, live.sets, frozenset(), flags=flags)
        items = nft.query({"list": {"ruleset": {"family": render.FAMILY}}}, terse=True)
    except ValueError as exc:
        # Text that is not JSON (as nft 1.0.6 prints a dormant table): a failed check that is
        # retried, never an exception that could end the verification loop.
        raise KernelError("unreadable_listing", errno.EPROTO, f"nft listed no JSON: {exc}") from exc
    listed = {
        str(i["set"]["name"])
        for i in items
        if "set" in i and i["set"].get("table") == table and i["set"].get("family") == "inet"
    }
    keys = {
        name: _netlink(set_element_keys, table, name) for name in interval_sets if name in listed
    }
    return observed_structure(items, table, keys)


def _netlink(dump: Callable[..., _T], *args: str) -> _T:
    """One netlink read; its failure (ENOBUFS, EMFILE ...) as a failed check with a reason."""
    try:
        return dump(*args)
    except OSError as exc:
        raise KernelError(
            "unreadable_listing", exc.errno or 0, f"netlink dump failed: {exc.strerror or exc}"
        ) from exc


def interval_sets(cfg: FirewallConfig) -> tuple[str, ...]:
    """Pure: the interval sets (static sources, guarded ports' sources) of ``cfg``'s table."""
    return tuple(sorted(name for name, _ in expected_structure(cfg).ranges))


def render_repair(cfg: FirewallConfig, observed: Structure, rogue: Rogue) -> list[render.Command]:
    """Pure: one batch that removes ``rogue`` from ``observed`` and renders the table again.

    Every listed chain is flushed first, so no rule still refers to what is deleted after it
    (a rogue rule may jump to a rogue chain or look up a rogue set); ``render_table`` then
    writes every chain's rules, the static sets and the objects afresh. The allow sets are
    deleted only when they are listed in ``rogue`` (their type or flags were changed): their
    elements are then gone, and the caller restores them in the same transaction.
    """
    t = cfg.table
    cmds: list[render.Command] = []
    if rogue.empty:
        return render.render_table(cfg)
    ref = {"family": render.FAMILY, "table": t}
    for name, *_ in sorted(observed.chains):
        cmds.append({"flush": {"chain": {**ref, "name": name}}})
    for name in rogue.chains:
        cmds.append({"delete": {"chain": {**ref, "name": name}}})
    for name in rogue.sets:
        cmds.append({"delete": {"set": {**ref, "name": name}}})
    for kind, name in rogue.objects:
        cmds.append({"delete": {kind: {**ref, "name": name}}})
    return cmds + render.render_table(cfg)
