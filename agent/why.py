"""Pure: would a packet from ADDRESS to PORT/PROTO be admitted? Our table, then everyone else's.

Owns the answer of ``vicifast-agent why``, over data the daemon read from the kernel (no I/O
here):

- ``agent_verdict``: what the agent's own table does with the packet (RULESET.md): an unprotected
  port is not touched; a protected one passes from a dynamic entry, a static source, or not at
  all; the agent's guarded ports (gRPC, metrics) pass from their configured sources only.
- ``other_chains_verdicts``: what every other table's base chain on the input hook does with it,
  by the one evaluator of foreign chains (``agent.rules.foreign``, which shadowing uses too). An
  accept in one base chain never overrides a drop in another, so any chain that drops is
  reported.

The packet is judged as the first packet of a new connection.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from agent.config import FirewallConfig, GuardedPort, IPNetwork, Profile
from agent.errors import InvalidArgument
from agent.model import Address
from agent.rules.foreign import (
    BaseChain,
    ChainFinding,
    ChainOutcome,
    ChainRef,
    IPAddress,
    NamedSet,
    Packet,
    RulesetView,
    SetElement,
    applies_to,
    evaluate_chain,
    input_base_chains,
    jump_targets,
    named_set,
    rules_by_chain,
    set_references,
)

__all__ = [
    "Admission",
    "AgentVerdict",
    "BaseChain",
    "ChainFinding",
    "ChainOutcome",
    "ChainRef",
    "NamedSet",
    "Packet",
    "RulesetView",
    "SetElement",
    "agent_verdict",
    "entry_address",
    "evaluate_chain",
    "input_base_chains",
    "jump_targets",
    "named_set",
    "other_chains_verdicts",
    "parse_packet",
    "protected_by",
    "rules_by_chain",
    "set_references",
]

_PORT_PROTO = re.compile(r"(?P<port>[0-9]{1,5})/(?P<proto>tcp|udp)")


def parse_packet(address: str, port_proto: str) -> Packet:
    """``("198.51.100.7", "5060/udp")`` -> Packet; ``InvalidArgument`` names what is wrong."""
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError as exc:
        raise InvalidArgument("invalid_address", f"{address!r} is not an IP address") from exc
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    m = _PORT_PROTO.fullmatch(port_proto.strip().lower())
    if not m or not 1 <= int(m["port"]) <= 65535:
        raise InvalidArgument(
            "invalid_port", f"{port_proto!r}: expected PORT/PROTO such as 5060/udp or 443/tcp"
        )
    return Packet(ip.version, int(m["port"]), m["proto"], ip)


# --- the agent's own table --------------------------------------------------------------------


class Admission(enum.Enum):
    ALLOWED = "allowed"  # a dynamic entry (or its /64) admits the source
    STATIC = "static"  # a static source from config
    UNPROTECTED = "unprotected"  # the agent's table does not touch this port
    DROPPED = "dropped"  # protected port, source not admitted
    LOOPBACK = "loopback"  # loopback traffic is never touched
    GUARD_ALLOWED = "guard_allowed"  # the agent's own port, source configured
    GUARD_DROPPED = "guard_dropped"  # the agent's own port, source not configured
    NO_TABLE = "no_table"  # the agent's table is missing: it drops nothing right now

    @property
    def admitted(self) -> bool:
        return self not in (Admission.DROPPED, Admission.GUARD_DROPPED)


@dataclass(frozen=True, slots=True)
class AgentVerdict:
    admission: Admission
    explanation: str
    profile: str = ""
    entry: str = ""  # the dynamic entry's address (e.g. its /64) when one admits the source


def entry_address(source: IPAddress, ipv6_prefix: int) -> Address:
    """The allow-set key a source is looked up under (its /64 under the /64 policy)."""
    if source.version == 6 and ipv6_prefix == 64:
        return Address(ipaddress.ip_network((source, 64), strict=False).compressed)
    return Address(str(source))


def protected_by(cfg: FirewallConfig, packet: Packet) -> Profile | GuardedPort | None:
    """The guarded port or profile whose rule in our input chain catches the packet, if any."""
    for guard in cfg.guarded_ports:  # jumped to before the profiles, tcp only
        if packet.protocol == "tcp" and packet.port == guard.port:
            return guard
    for prof in cfg.profiles:
        if any(r.contains(packet.protocol, packet.port) for r in prof.ports):
            return prof
    return None


def _in_networks(source: IPAddress, nets: Iterable[IPNetwork]) -> IPNetwork | None:
    return next((n for n in nets if n.version == source.version and source in n), None)


def agent_verdict(
    cfg: FirewallConfig, packet: Packet, *, in_dynamic_set: bool, table_present: bool = True
) -> AgentVerdict:
    """What our table does with ``packet``; ``in_dynamic_set`` comes from the kernel's set."""
    if packet.source is None:
        raise ValueError("the agent's verdict needs a source address")
    target = protected_by(cfg, packet)
    if target is None:
        ports = "; ".join(f"{p.name}: {', '.join(map(str, p.ports))}" for p in cfg.profiles)
        return AgentVerdict(
            Admission.UNPROTECTED,
            f"{packet.protocol}/{packet.port} is not a protected port, so the agent's table "
            f"lets it through untouched (protected ports: {ports or 'none'})",
        )
    if not table_present:
        return AgentVerdict(
            Admission.NO_TABLE,
            f"the agent's table inet {cfg.table} is missing, so it drops nothing right now; "
            "the daemon restores it on its own (see `vicifast-agent doctor`)",
        )
    if packet.source.is_loopback:
        return AgentVerdict(Admission.LOOPBACK, "loopback traffic is never touched")
    if isinstance(target, GuardedPort):
        return _guard_verdict(target, packet.source)
    return _profile_verdict(cfg, target, packet, in_dynamic_set)


def _guard_verdict(guard: GuardedPort, source: IPAddress) -> AgentVerdict:
    net = _in_networks(source, guard.sources)
    if net is not None:
        return AgentVerdict(
            Admission.GUARD_ALLOWED,
            f"tcp/{guard.port} is the agent's {guard.name} port and {source} is in its "
            f"configured sources ({net})",
        )
    return AgentVerdict(
        Admission.GUARD_DROPPED,
        f"tcp/{guard.port} is the agent's {guard.name} port, open only to its configured "
        f"sources; {source} is not one of them",
    )


def _profile_verdict(
    cfg: FirewallConfig, prof: Profile, packet: Packet, in_dynamic_set: bool
) -> AgentVerdict:
    assert packet.source is not None
    source = packet.source
    key = entry_address(source, cfg.ipv6_prefix)
    if in_dynamic_set:
        via = f" (entry {key.text})" if key.text != str(source) else ""
        return AgentVerdict(
            Admission.ALLOWED,
            f"{source} has an allow entry in profile {prof.name}{via}",
            prof.name,
            key.text,
        )
    net = _in_networks(source, prof.static_sources)
    if net is not None:
        return AgentVerdict(
            Admission.STATIC,
            f"{source} is a static source of profile {prof.name} ({net}, from the config)",
            prof.name,
        )
    return AgentVerdict(
        Admission.DROPPED,
        f"{packet.protocol}/{packet.port} is protected by profile {prof.name} and {source} "
        "has no allow entry and is no static source: the agent's table drops it",
        prof.name,
    )


def other_chains_verdicts(view: RulesetView, packet: Packet) -> list[ChainFinding]:
    """Every other input base chain of the packet's family, evaluated."""
    return [
        evaluate_chain(view, c, packet) for c in view.base_chains if applies_to(c, packet.family)
    ]
