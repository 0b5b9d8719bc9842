"""``ctl`` output: human tables and lines, or JSON with the proto's field names."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from agent.rpc.pb import agent_pb2
from agent.terminal import counted, printable, table, utc_iso, when

__all__ = ["format_apply_result", "format_event", "format_state", "to_json", "when"]


def to_json(message: Message) -> dict[str, Any]:
    """Proto field names, every field (defaults too), enum names, 64-bit ints as numbers."""
    out: dict[str, Any] = json_format.MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        unquote_int64_if_possible=True,
    )
    return out


def format_apply_result(result: agent_pb2.ApplyResult, now_ms: int, *, erase: bool = False) -> str:
    head = f"request {result.request_id}  state_version {result.state_version}"
    if erase:
        head += f"  erased_records {result.erased_records}"
    rows = [
        (
            r.address,
            r.profile or "-",
            agent_pb2.Status.Name(r.status),
            when(r.expires_at_unix_ms, now_ms),
            r.reason or "-",
        )
        for r in result.results
    ]
    if not rows:
        return f"{head}\n(no entries)"
    return f"{head}\n{table(('ADDRESS', 'PROFILE', 'STATUS', 'EXPIRES', 'REASON'), rows)}"


def format_state(state: agent_pb2.AgentState, local_now_ms: int) -> str:
    now = state.now_unix_ms
    sync = "in sync" if state.ruleset_in_sync else "NOT IN SYNC"
    lines = [
        f"agent        {state.agent_id}, vicifast-agent {state.version},"
        f" started {when(state.started_at_unix_ms, now)}",
        f"ruleset      {sync}, verified {when(state.last_verified_at_unix_ms, now)},"
        f" {state.drift_repairs} drift repairs",
        f"profiles     {', '.join(state.profiles) or '-'}",
        f"trusted keys {', '.join(state.trusted_keyids) or '-'}",
    ]
    skew_s = (now - local_now_ms) / 1000
    if abs(skew_s) >= 2:  # a request's window tolerates 30 s; say so well before it matters
        ahead = "ahead of" if skew_s > 0 else "behind"
        lines.append(f"clock        the agent is {abs(skew_s):.1f} s {ahead} this host")
    lines.append(
        f"state        version {state.state_version},"
        f" {counted(len(state.entries), 'entry', 'entries')}"
    )
    if state.entries:
        rows = [
            (
                e.address,
                e.profile,
                printable(e.subject),
                when(e.expires_at_unix_ms, now),
                e.request_id,
            )
            for e in state.entries
        ]
        lines += ["", table(("ADDRESS", "PROFILE", "SUBJECT", "EXPIRES", "REQUEST"), rows)]
    return "\n".join(lines)


def format_event(event: agent_pb2.AgentEvent, now_ms: int) -> str:
    kind = agent_pb2.AgentEvent.Kind.Name(event.kind)
    parts: list[str] = [f"#{event.state_version}", utc_iso(event.at_unix_ms), kind]
    if event.HasField("entry"):
        e = event.entry
        parts += [e.address, e.profile, f"subject={printable(e.subject)}"]
        if e.expires_at_unix_ms:
            parts.append(f"expires {when(e.expires_at_unix_ms, now_ms)}")
    if event.detail:
        parts.append(printable(event.detail))
    return "  ".join(parts)
