"""The sysadmin's CLI (status, list, allow, revoke, doctor, why, audit, reload), local socket.

Every command asks the daemon (``agent.local.client``); none reads or edits the nftables table
itself, so a grant made here is ordered, recorded and reported like any other. Output is a
human-readable table by default and JSON with ``--json``. Only ``doctor`` works without the
daemon, from files alone, and says so.

Exit codes: 0 success; 1 ``why``: not admitted (or another table may drop it), ``doctor``:
warnings; 2 ``doctor``: problems; 3 the daemon refused the request (the reason word is
printed); 4 the daemon is not reachable.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import doctor
from agent.config import DEFAULT_CONFIG_PATH, LocalConfig, load_config
from agent.errors import ConfigError
from agent.local.client import LocalCallError, LocalClient, LocalUnreachable
from agent.terminal import printable, span, table, utc_iso

EXIT_REFUSED = 3
EXIT_UNREACHABLE = 4


# --- pure rendering ----------------------------------------------------------------------------


def _ago(now_ms: int, at_ms: int) -> str:
    if not at_ms:
        return "never"
    return f"{span(max(0, (now_ms - at_ms) // 1000))} ago"


def format_status(s: dict[str, Any]) -> str:
    now = int(s["now_ms"])
    by_profile = ", ".join(f"{p} {n}" for p, n in s["entries_by_profile"].items())
    lines = [
        f"vicifast-agent {s['version']} (pid {s['pid']}), agent_id {s['agent_id']}",
        f"  up:            {span(max(0, (now - int(s['started_at_ms'])) // 1000))}",
        f"  entries:       {s['entries']} ({s['local_entries']} local; {by_profile})",
        f"  state_version: {s['state_version']}",
        f"  table:         {s['table']}, {'in sync' if s['in_sync'] else 'OUT OF SYNC'}, "
        f"verified {_ago(now, int(s['last_verified_at_ms']))}, "
        f"{s['drift_repairs']} drift repairs",
        f"  listening:     api {s['listen']['api']}, metrics {s['listen']['metrics']}, "
        f"local {s['listen']['local']}",
    ]
    if "trusted_keys" in s:
        keys = ", ".join(s["trusted_keys"]) or "NONE (no signed request can be accepted)"
        lines.append(f"  trusted keys:  {keys}")
    if "clock" in s:
        c = s["clock"]
        ntp = {True: "NTP synchronized", False: "NOT NTP synchronized", None: "NTP state unknown"}
        lines.append(
            f"  clock:         {utc_iso(int(c['now_ms']))}, {ntp[c['ntp_synchronized']]}; "
            f"requests accepted within {c['clock_skew_s']} s of skew, "
            f"valid for at most {c['max_window_s']} s"
        )
    lines.append(_format_loops(s.get("loops") or {}))
    if s.get("repair_storm"):
        lines.append(
            f"  UNHEALTHY:     {s.get('drift_repairs_last_minute', 0)} drift repairs in the last "
            "minute: something keeps changing the table back (a second agent on this table, "
            "or a firewall reloading in a loop?)"
        )
    if not s["shadowing"]:
        lines.append("  shadowing:     none")
    for sh in s["shadowing"]:
        lines.append(f"  SHADOWING:     {sh['description']}")
    return "\n".join(lines)


def _format_loops(loops: dict[str, Any]) -> str:
    """The supervised loops' line: the stalled ones first (the watchdog is not fed then)."""
    faults = {name: n for name, n in (loops.get("faults") or {}).items() if n}
    faulted = ", ".join(f"{name} {n}" for name, n in sorted(faults.items())) or "none"
    stalled = loops.get("stalled") or []
    if stalled:
        return (
            f"  LOOPS STALLED: {', '.join(stalled)} (watchdog not fed: systemd restarts the "
            f"daemon); faults: {faulted}"
        )
    return f"  loops:         all turning; faults since start: {faulted}"


def format_entries(result: dict[str, Any]) -> str:
    entries = result["entries"]
    rows = [
        [
            e["address"],
            e["profile"],
            printable(e["subject"]),
            span(int(e["expires_in_s"])),
            e["source"],
            e["request_id"],
        ]
        for e in entries
    ]
    text = table(["ADDRESS", "PROFILE", "SUBJECT", "EXPIRES IN", "SOURCE", "REQUEST"], rows)
    return f"{text}\n{len(entries)} entries (state_version {result['state_version']})"


def format_outcome(result: dict[str, Any], now_ms: int) -> str:
    rows = [
        [
            r["address"],
            r["profile"],
            r["status"],
            span(max(0, (int(r["expires_at_ms"]) - now_ms) // 1000)) if r["expires_at_ms"] else "-",
            r["reason"] or "",
        ]
        for r in result["results"]
    ]
    lines = [table(["ADDRESS", "PROFILE", "STATUS", "EXPIRES IN", "REASON"], rows)]
    tail = f"request {result['request_id']}, state_version {result['state_version']}"
    if "ttl_s" in result:
        capped = " (capped by [local] ttl_cap_s)" if result["ttl_capped"] else ""
        tail = f"local grant for {result['ttl_s']} s{capped}; {tail}"
    lines.append(tail)
    return "\n".join(lines)


def format_audit(result: dict[str, Any]) -> str:
    rows = [
        [
            utc_iso(int(r["at_ms"])),
            r["action"],
            r["address"] or "-",
            r["profile"] or "-",
            printable(r["subject"]),
            r["request_id"],
            r["caller"] or "-",
            printable(r["detail"]),
        ]
        for r in result["rows"]
    ]
    headers = [
        "TIME",
        "ACTION",
        "ADDRESS",
        "PROFILE",
        "SUBJECT",
        "REQUEST",
        "CALLER",
        "DETAIL",
    ]
    return f"{table(headers, rows)}\n{len(rows)} audit rows"


def why_exit_code(result: dict[str, Any]) -> int:
    others_drop = any(c["outcome"] != "accepts" for c in result["other_chains"])
    return 0 if result["agent"]["admitted"] and not others_drop else 1


def format_why(result: dict[str, Any]) -> str:
    p = result["packet"]
    a = result["agent"]
    verdict = "ADMITTED" if a["admitted"] else "DROPPED"
    lines = [f"{p['protocol']}/{p['port']} from {p['address']}:"]
    lines.append(f"  agent's table: {verdict} ({a['admission']}): {a['explanation']}")
    entry = a.get("state_entry")
    if entry:
        lines.append(
            f"    entry: subject {printable(entry['subject'])}, {entry['source']}, expires in "
            f"{span(int(entry['expires_in_s']))}, request {entry['request_id']}"
        )
    if not result["other_chains"]:
        lines.append("  other tables: no other base chain on the input hook")
    for c in result["other_chains"]:
        word = {"accepts": "accepts", "drops": "DROPS", "may_drop": "MAY DROP"}[c["outcome"]]
        lines.append(
            f"  {c['chain']} (priority {c['priority']}, policy {c['policy']}): {word}: "
            f"{c['reason']}"
        )
    lines.append(
        "  verdict: admitted"
        if why_exit_code(result) == 0
        else "  verdict: NOT admitted (or another table may still drop it)"
    )
    return "\n".join(lines)


# --- commands ----------------------------------------------------------------------------------


def _socket_path(args: argparse.Namespace) -> Path:
    if args.socket:
        return Path(args.socket)
    try:
        return load_config(Path(args.config)).local.socket
    except ConfigError:
        return LocalConfig().socket


def _print(args: argparse.Namespace, result: dict[str, Any], text: str) -> None:
    print(json.dumps(result) if args.json else text)


def _call(args: argparse.Namespace, op: str, **params: Any) -> dict[str, Any] | int:
    """The daemon's result, or the exit code after printing why there is none."""
    try:
        return LocalClient(_socket_path(args), timeout=args.timeout).call(op, **params)
    except LocalUnreachable as exc:
        _fail(args, "unreachable", exc.reason, str(exc.path))
        return EXIT_UNREACHABLE
    except LocalCallError as exc:
        _fail(args, exc.reason, exc.detail, exc.kind.value)
        return EXIT_REFUSED


def _fail(args: argparse.Namespace, reason: str, detail: str, context: str) -> None:
    if args.json:
        print(json.dumps({"error": {"reason": reason, "detail": detail, "context": context}}))
    else:
        print(f"vicifast-agent: {reason}: {detail} ({context})", file=sys.stderr)


def _show(
    args: argparse.Namespace, op: str, render: Callable[[dict[str, Any]], str], *fields: str
) -> int:
    """Ask the daemon ``op`` with the options named ``fields``, print its answer (``render``
    for people, JSON with ``--json``), and return 0, or the exit code saying why there is none."""
    result = _call(args, op, **{name: getattr(args, name) for name in fields})
    if isinstance(result, int):
        return result
    _print(args, result, render(result))
    return 0


def _outcome_now(result: dict[str, Any]) -> str:
    return format_outcome(result, int(time.time() * 1000))


def _status(args: argparse.Namespace) -> int:
    return _show(args, "status", format_status)


def _list(args: argparse.Namespace) -> int:
    return _show(args, "list", format_entries, "profile", "subject")


def _allow(args: argparse.Namespace) -> int:
    return _show(args, "allow", _outcome_now, "addresses", "ttl", "subject", "profile")


def _revoke(args: argparse.Namespace) -> int:
    if bool(args.addresses) == bool(args.subject):
        print("vicifast-agent revoke: give ADDRESS... or --subject, not both", file=sys.stderr)
        return 2
    return _show(args, "revoke", _outcome_now, "addresses", "subject", "profile")


def _doctor(args: argparse.Namespace) -> int:
    path = _socket_path(args)
    try:
        result = LocalClient(path, timeout=args.timeout).call("doctor")
        checks = [doctor.Check.from_json(c) for c in result["checks"]]
    except LocalUnreachable as exc:
        checks = _offline(args, doctor.daemon_unreachable(path, exc.reason))
    except LocalCallError as exc:
        checks = _offline(args, doctor.daemon_unreachable(path, f"refused: {exc}"))
    code = doctor.exit_code(checks)
    if args.json:
        print(json.dumps({"checks": [c.to_json() for c in checks], "exit_code": code}))
    else:
        print(doctor.render(checks))
    return code


def _reload(args: argparse.Namespace) -> int:
    """The daemon's verdict on a reload: 0 reloaded, 3 refused (the reason printed), 4 no
    daemon. With ``--pid`` and no local socket to ask, the old way: SIGHUP, verdict unknown."""
    try:
        result = LocalClient(_socket_path(args), timeout=args.timeout).call("reload")
    except LocalUnreachable as exc:
        if not args.pid:
            _fail(args, "unreachable", exc.reason, str(exc.path))
            return EXIT_UNREACHABLE
        os.kill(args.pid, signal.SIGHUP)
        print(
            f"vicifast-agent reload: local socket {exc.path} unreachable ({exc.reason}); sent "
            f"SIGHUP to pid {args.pid}: the verdict is in the journal (journalctl -u "
            "vicifast-agent)",
            file=sys.stderr,
        )
        return 0
    except LocalCallError as exc:
        _fail(args, exc.reason, exc.detail, exc.kind.value)
        return EXIT_REFUSED
    _print(args, result, f"reloaded configuration from {result['config']}")
    return 0


def _offline(args: argparse.Namespace, unreachable: doctor.Check) -> list[doctor.Check]:
    privileges = doctor.privileges_check()
    checks = [privileges] if privileges else []
    return [*checks, unreachable, *doctor.offline_checks(Path(args.config), time.time())]


def _why(args: argparse.Namespace) -> int:
    result = _call(args, "why", address=args.address, port=args.port)
    if isinstance(result, int):
        return result
    _print(args, result, format_why(result))
    return why_exit_code(result)


def _audit(args: argparse.Namespace) -> int:
    return _show(args, "audit", format_audit, "request_id", "subject", "address", "limit")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--socket", help="the daemon's local socket (default: from --config)")
    p.add_argument(
        "--config", default=str(DEFAULT_CONFIG_PATH), help="config file naming the socket"
    )
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the daemon")


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the sysadmin's commands on the top-level parser."""
    p = sub.add_parser("status", help="the daemon's state in one screen")
    _common(p)
    p.set_defaults(handler=_status)

    p = sub.add_parser("list", help="entries the kernel enforces")
    _common(p)
    p.add_argument("--profile", default="", help="only this profile")
    p.add_argument("--subject", default="", help="only this subject")
    p.set_defaults(handler=_list)

    p = sub.add_parser("allow", help="grant ADDRESS locally (TTL capped by [local] ttl_cap_s)")
    _common(p)
    p.add_argument("addresses", nargs="+", metavar="ADDRESS")
    p.add_argument("--ttl", type=int, default=0, help="seconds (0 = default, capped)")
    p.add_argument("--subject", default="", help="who the grant is for")
    p.add_argument("--profile", default="", help="port profile (default profile if omitted)")
    p.set_defaults(handler=_allow)

    p = sub.add_parser("revoke", help="remove entries by address or by subject")
    _common(p)
    p.add_argument("addresses", nargs="*", metavar="ADDRESS")
    p.add_argument("--subject", default="", help="every entry of this subject")
    p.add_argument("--profile", default="", help="only in this profile (default: every profile)")
    p.set_defaults(handler=_revoke)

    p = sub.add_parser("doctor", help="check the agent and its host, explain what is wrong")
    _common(p)
    p.set_defaults(handler=_doctor)

    p = sub.add_parser("why", help="would a packet from ADDRESS to PORT/PROTO be admitted?")
    _common(p)
    p.add_argument("address", metavar="ADDRESS")
    p.add_argument("port", metavar="PORT/PROTO", help="e.g. 5060/udp")
    p.set_defaults(handler=_why)

    p = sub.add_parser(
        "reload",
        help="reload the configuration and say whether the daemon took it",
        description="Ask the running daemon to re-read its configuration, certificates, client "
        "CA and trusted keys, and wait for its verdict: exit 0 reloaded, 3 refused (the "
        "running configuration stays; the reason is printed), 4 the daemon is not reachable. "
        "Root only. `systemctl reload vicifast-agent` runs this.",
    )
    _common(p)
    p.add_argument(
        "--pid",
        type=int,
        default=0,
        help="if the local socket cannot be reached (disabled), send SIGHUP to this pid instead",
    )
    p.set_defaults(handler=_reload)

    p = sub.add_parser(
        "audit", help="the audit log: who changed which entry, by request id, subject or address"
    )
    _common(p)
    p.add_argument("--request-id", default="", help="only this request (as logged)")
    p.add_argument("--subject", default="", help="only this subject")
    p.add_argument("--address", default="", help="only this address")
    p.add_argument("--limit", type=int, default=0, help="newest rows to show (default 50)")
    p.set_defaults(handler=_audit)
