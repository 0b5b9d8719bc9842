"""The sysadmin's CLI (status, list, allow, revoke, doctor, why, audit, reload), local socket.

Every command asks the daemon (``agent.local.client``); none reads or edits the nftables table
itself, so a grant made here is ordered, recorded and reported like any other. Output is a
human-readable table by default and JSON with ``--json``. Only ``doctor`` works without the
daemon, from files alone, and says so.

Exit codes and the shape of errors are the CLI's one contract (``agent.cli_contract``): 0
success; 1 ``why``: not admitted (or another table may drop it), ``doctor``: warnings; 2 usage
error; 3 the daemon refused the request (the reason word is printed); 4 the daemon is not
reachable; 5 ``doctor``: problems.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import doctor
from agent.cli_contract import Exit, Failure, exit_epilog, report
from agent.config import DEFAULT_CONFIG_PATH, LocalConfig, load_config
from agent.errors import ConfigError, InvalidArgument
from agent.local.client import LocalCallError, LocalClient, LocalUnreachable
from agent.terminal import counted, parse_duration, printable, span, table, utc_iso, when
from agent.why import parse_packet

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
    """One row per entry; EXPIRES is the UTC time and the time left (``2026-12-07T22:00:00Z
    (in 59m 59s)``), as ``ctl state`` prints it."""
    entries = result["entries"]
    now = int(result["now_ms"])
    rows = [
        [
            e["address"],
            e["profile"],
            printable(e["subject"]),
            when(int(e["expires_at_ms"]), now),
            e["source"],
            e["request_id"],
        ]
        for e in entries
    ]
    text = table(["ADDRESS", "PROFILE", "SUBJECT", "EXPIRES", "SOURCE", "REQUEST"], rows)
    summary = counted(len(entries), "entry", "entries")
    return f"{text}\n{summary} (state_version {result['state_version']})"


def format_outcome(result: dict[str, Any], now_ms: int) -> str:
    rows = [
        [
            r["address"],
            r["profile"],
            r["status"],
            when(int(r["expires_at_ms"]), now_ms),
            r["reason"] or "",
        ]
        for r in result["results"]
    ]
    lines = [table(["ADDRESS", "PROFILE", "STATUS", "EXPIRES", "REASON"], rows)]
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
    return f"{table(headers, rows)}\n{counted(len(rows), 'audit row', 'audit rows')}"


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


def unreachable(exc: LocalUnreachable) -> Failure:
    return Failure(
        "unreachable",
        f"{exc.path}: {exc.reason}",
        Exit.UNREACHABLE,
        code="UNAVAILABLE",
        extra={"socket": str(exc.path)},
    )


def refused(exc: LocalCallError) -> Failure:
    """The daemon's refusal: its reason word, and its kind as the gRPC code ``ctl`` would see."""
    return Failure(exc.reason, exc.detail, Exit.REFUSED, code=exc.kind.name)


def _call(args: argparse.Namespace, op: str, **params: Any) -> dict[str, Any] | int:
    """The daemon's result, or the exit code after printing why there is none."""
    try:
        return LocalClient(_socket_path(args), timeout=args.timeout).call(op, **params)
    except LocalUnreachable as exc:
        return report(unreachable(exc), json_output=args.json)
    except LocalCallError as exc:
        return report(refused(exc), json_output=args.json)


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
    if not args.addresses and not args.subject:
        why = "nothing to revoke: give the ADDRESS(es) to revoke, or --subject S for all of S's"
    elif args.addresses and args.subject:
        why = "give ADDRESS... or --subject, not both (--subject revokes every entry of S)"
    else:
        return _show(args, "revoke", _outcome_now, "addresses", "subject", "profile")
    return report(Failure("usage", why, Exit.USAGE), json_output=args.json)


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
            return report(unreachable(exc), json_output=args.json)
        os.kill(args.pid, signal.SIGHUP)
        print(
            f"vicifast-agent reload: local socket {exc.path} unreachable ({exc.reason}); sent "
            f"SIGHUP to pid {args.pid}: the verdict is in the journal (journalctl -u "
            "vicifast-agent)",
            file=sys.stderr,
        )
        return int(Exit.OK)
    except LocalCallError as exc:
        return report(refused(exc), json_output=args.json)
    _print(args, result, f"reloaded configuration from {result['config']}")
    return int(Exit.OK)


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


def duration(text: str) -> int:
    """An argparse type: seconds, or a duration with units (``90m``, ``1h``, ``2d``)."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def ip_address(text: str) -> str:
    """An argparse type for ``why``: an IP address (the daemon judges it further)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        if any(c.isalpha() for c in text) and ":" not in text:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not an IP address (host names are not accepted: give the address)"
            ) from None
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None
    return text


def port_proto(text: str) -> str:
    """An argparse type for ``why``: ``PORT/PROTO`` such as ``5060/udp``."""
    try:
        parse_packet("198.18.0.1", text)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(exc.detail) from None
    return text


_LOCAL_EXITS = (Exit.OK, Exit.USAGE, Exit.REFUSED, Exit.UNREACHABLE, Exit.INTERRUPTED)


def _command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    summary: str,
    description: str,
    *,
    exits: tuple[Exit, ...] = _LOCAL_EXITS,
    meanings: dict[Exit, str] | None = None,
) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help=summary,
        description=description,
        epilog=exit_epilog(exits, meanings),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--socket", help="the daemon's local socket (default: from --config)")
    p.add_argument(
        "--config", default=str(DEFAULT_CONFIG_PATH), help="config file naming the socket"
    )
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the daemon")
    return p


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the sysadmin's commands on the top-level parser."""
    p = _command(
        sub,
        "status",
        "the daemon's state in one screen",
        "The running daemon's version, entries (local grants, per profile), state_version,\n"
        "whether the kernel's table is in sync and when it was verified, drift repairs,\n"
        "listen addresses and any other table that would drop what the agent allows.",
    )
    p.set_defaults(handler=_status)

    p = _command(
        sub,
        "list",
        "entries the kernel enforces",
        "The entries the kernel enforces now, with when each expires (UTC, and the time\n"
        "left), its source (remote: the control plane; local: granted on this host) and\n"
        "its request id.",
    )
    p.add_argument("--profile", default="", help="only this profile")
    p.add_argument("--subject", default="", help="only this subject")
    p.set_defaults(handler=_list)

    p = _command(
        sub,
        "allow",
        "grant ADDRESS locally (TTL capped by [local] ttl_cap_s)",
        "A local grant through the daemon, e.g. while the control plane is unreachable:\n"
        "the same validation as a signed request, a TTL capped by [local] ttl_cap_s, and\n"
        "the entry is marked local. ADDRESS is an IPv4 or IPv6 address (an IPv6 address\n"
        "stands for its /64 under the default policy), never a host name.",
    )
    p.add_argument("addresses", nargs="+", metavar="ADDRESS")
    p.add_argument(
        "--ttl",
        type=duration,
        default=0,
        metavar="DURATION",
        help="seconds, or with a unit: 90m, 1h, 2d (default: the agent's default; capped)",
    )
    p.add_argument("--subject", default="", help="who the grant is for")
    p.add_argument("--profile", default="", help="port profile (default profile if omitted)")
    p.set_defaults(handler=_allow)

    p = _command(
        sub,
        "revoke",
        "remove entries by address or by subject",
        "Remove entries (local or remote) by ADDRESS, or every entry of --subject S; give\n"
        "one or the other. An address with no entry is reported NOT_FOUND.",
    )
    p.add_argument("addresses", nargs="*", metavar="ADDRESS")
    p.add_argument("--subject", default="", help="every entry of this subject")
    p.add_argument("--profile", default="", help="only in this profile (default: every profile)")
    p.set_defaults(handler=_revoke)

    p = _command(
        sub,
        "doctor",
        "check the agent and its host, explain what is wrong",
        "Checks the daemon, the config file, kernel features, the agent's table, other\n"
        "tables that would drop allowed traffic, the state directory, certificates and\n"
        "the clock, and says what to do. Without the daemon it runs the checks that need\n"
        "only files (the unreachable daemon is itself a problem).",
        exits=(Exit.OK, Exit.NO, Exit.USAGE, Exit.PROBLEMS, Exit.INTERRUPTED),
        meanings={Exit.NO: "warnings only"},
    )
    p.set_defaults(handler=_doctor)

    p = _command(
        sub,
        "why",
        "would a packet from ADDRESS to PORT/PROTO be admitted?",
        "What the agent's table does with a new connection from ADDRESS to PORT/PROTO,\n"
        "and what every other table's input chain does with it.",
        exits=(Exit.OK, Exit.NO, *_LOCAL_EXITS[1:]),
        meanings={
            Exit.OK: "admitted",
            Exit.NO: "not admitted, or another table may still drop it",
        },
    )
    p.add_argument("address", metavar="ADDRESS", type=ip_address)
    p.add_argument("port", metavar="PORT/PROTO", type=port_proto, help="e.g. 5060/udp")
    p.set_defaults(handler=_why)

    p = _command(
        sub,
        "reload",
        "reload the configuration and say whether the daemon took it",
        "Ask the running daemon to re-read its configuration, certificates, client CA and\n"
        "trusted keys, and wait for its verdict: the running configuration stays when it\n"
        "refuses (the reason is printed). Root only. `systemctl reload vicifast-agent` runs\n"
        "this.",
        meanings={Exit.OK: "reloaded", Exit.REFUSED: "refused: the running configuration stays"},
    )
    p.add_argument(
        "--pid",
        type=int,
        default=0,
        help="if the local socket cannot be reached (disabled), send SIGHUP to this pid instead",
    )
    p.set_defaults(handler=_reload)

    p = _command(
        sub,
        "audit",
        "the audit log: who changed which entry, by request id, subject or address",
        "Audit rows, newest last: who (caller identity and key id, or local:uid=...)\n"
        "changed which entry, when (UTC), on which request. Root only. The journal names\n"
        "requests, never people: this is where a log line's request id leads.",
    )
    p.add_argument("--request-id", default="", help="only this request (as logged)")
    p.add_argument("--subject", default="", help="only this subject")
    p.add_argument("--address", default="", help="only this address")
    p.add_argument("--limit", type=int, default=0, help="newest rows to show (default 50)")
    p.set_defaults(handler=_audit)
