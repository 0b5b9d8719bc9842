"""Pure: the local socket's policy: who may connect, how often, for how long a grant lasts.

Owns the rules that stand in for mTLS and signatures on the local socket (PROTOCOL.md "Local
socket"): root and members of one configured group only (the audit log root alone), a per-peer
rate limit on changes, a TTL cap, and the ``local-`` request ids that mark a grant as local
everywhere (state, events, logs, the element comment). Reads no clock of its own and does no
I/O.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from agent.errors import InvalidArgument, PermissionDenied, ResourceExhausted
from agent.policy import TtlBounds
from agent.state import LOCAL_PREFIX


@dataclass(frozen=True, slots=True)
class Peer:
    """The connecting process's credentials, as the kernel reported them (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    user: str = ""

    @property
    def identity(self) -> str:
        """The caller identity recorded in audit rows and logs."""
        return f"local:uid={self.uid}" + (f"({self.user})" if self.user else "")


def authorize(peer: Peer, group_gid: int | None) -> None:
    """Root always; otherwise a member of the configured group (primary or supplementary)."""
    if peer.uid == 0:
        return
    if group_gid is not None and (peer.gid == group_gid or group_gid in peer.groups):
        return
    raise PermissionDenied(
        "local_peer_not_allowed",
        f"uid {peer.uid} is neither root nor a member of the configured [local] group",
    )


def authorize_history(peer: Peer) -> None:
    """Root only: the audit log is a week of who had access from where. The group (a local
    fallback portal, say) needs today's entries to do its job, not that history."""
    if peer.uid != 0:
        raise PermissionDenied(
            "local_root_only", f"uid {peer.uid}: only root may read the audit log"
        )


def authorize_reload(peer: Peer) -> None:
    """Root only, as ``systemctl reload`` is (the unit's ExecReload runs it as root)."""
    if peer.uid != 0:
        raise PermissionDenied("local_root_only", f"uid {peer.uid}: only root may reload")


@dataclass(frozen=True, slots=True)
class LocalTtl:
    seconds: int
    capped: bool


def local_ttl(requested: int, bounds: TtlBounds, cap: int) -> LocalTtl:
    """The TTL of a local grant: 0 = the default, and never more than ``cap``.

    A longer request is capped rather than refused: the sysadmin asked for access and gets the
    longest a local grant may have. Below the configured minimum is still an error.
    """
    wanted = requested or bounds.default
    if wanted < bounds.minimum:
        raise InvalidArgument(
            "invalid_ttl", f"ttl {wanted} s is below the configured minimum {bounds.minimum} s"
        )
    ceiling = min(cap, bounds.maximum)
    return LocalTtl(min(wanted, ceiling), wanted > ceiling)


def local_request_id() -> str:
    """A fresh request id marking a local grant (remote envelopes may not use the prefix)."""
    return LOCAL_PREFIX + secrets.token_hex(8)


@dataclass(slots=True)
class RateLimiter:
    """A token bucket per peer uid: ``burst`` at once, refilled at ``per_minute``."""

    per_minute: int
    burst: int
    _buckets: dict[int, tuple[float, float]] = field(default_factory=dict)

    def take(self, uid: int, now_s: float) -> None:
        """Spend one token of ``uid`` or raise ``rate_limited`` (RESOURCE_EXHAUSTED)."""
        tokens, last = self._buckets.get(uid, (float(self.burst), now_s))
        tokens = min(float(self.burst), tokens + (now_s - last) * self.per_minute / 60.0)
        if tokens < 1.0:
            wait = (1.0 - tokens) * 60.0 / self.per_minute
            self._buckets[uid] = (tokens, now_s)
            raise ResourceExhausted(
                "rate_limited",
                f"uid {uid} made too many changes over the local socket; retry in {wait:.0f} s",
            )
        self._buckets[uid] = (tokens - 1.0, now_s)
