"""The ``ctl`` commands (allow, revoke, sync, erase, state, watch), their arguments and exit
codes; requests go only through ``agent.rpc.client.AgentClient``."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message

from agent.cli_contract import Exit, Failure, exit_epilog, report
from agent.ctl import CtlError
from agent.ctl.connection import CONNECTION_KEYS, ENV_PREFIX, resolve_connection
from agent.ctl.entries import parse_sync_entries
from agent.ctl.output import format_apply_result, format_event, format_state, to_json
from agent.rpc.client import AgentCallError, AgentClient, Entry
from agent.rpc.pb import agent_pb2
from agent.rpc.signing import new_request_id
from agent.terminal import parse_duration

# The agent's status messages start with a snake_case reason word; anything else came from the
# gRPC transport (no connection, TLS handshake failed, deadline), not from the agent.
_REASON_WORD = re.compile(r"[a-z][a-z0-9_]*")
_NO_ANSWER = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def _now_ms() -> int:
    return int(time.time() * 1000)


def _emit(args: argparse.Namespace, message: Message, human: Callable[[], str]) -> None:
    print(json.dumps(to_json(message)) if args.json else human(), flush=True)


@dataclass(frozen=True, slots=True)
class _Pinned:
    """The identity of a signed request: resending both reproduces its exact bytes."""

    request_id: str
    issued_at_ms: int

    def clock(self) -> float:
        # AgentClient stamps int(clock() * 1000); half a millisecond keeps that exact.
        return (self.issued_at_ms + 0.5) / 1000

    def retry_hint(self) -> str:
        return (
            "the agent may or may not have applied it; resend the identical request with"
            f" the same arguments plus --request-id {self.request_id}"
            f" --issued-at {self.issued_at_ms}: the agent applies a request once and answers a"
            " resend with the original result"
        )

    def unknown_outcome(self, failure: Failure) -> Failure:
        """``failure`` with what resends the identical request (JSON keys and a hint)."""
        return dataclasses.replace(
            failure,
            extra={"request_id": self.request_id, "issued_at_ms": self.issued_at_ms},
            hint=self.retry_hint(),
        )


def _pinned(args: argparse.Namespace) -> _Pinned:
    return _Pinned(
        request_id=args.request_id or new_request_id(),
        issued_at_ms=_now_ms() if args.issued_at is None else args.issued_at,
    )


def _client(args: argparse.Namespace, *, signing: bool, clock: Callable[[], float]) -> AgentClient:
    options = {name: getattr(args, name, None) for name in CONNECTION_KEYS}
    conn = resolve_connection(
        options, os.environ, connection_file=getattr(args, "connection", None)
    )
    return AgentClient(
        conn.target,
        conn.agent_id,
        conn.identity(signing=signing),
        server_name=conn.server_name,
        timeout_s=conn.timeout_s,
        clock=clock,
    )


def _apply(
    args: argparse.Namespace,
    rpc: str,
    build: Callable[[AgentClient, str], agent_pb2.SignedEnvelope],
) -> int:
    pinned = _pinned(args)
    with _client(args, signing=True, clock=pinned.clock) as client:
        envelope = build(client, pinned.request_id)
        try:
            result = client.send(rpc, envelope)
        except AgentCallError as exc:
            failure = call_failure(exc)
            if failure.exit_code == Exit.UNREACHABLE:
                failure = pinned.unknown_outcome(failure)
            return report(failure, json_output=args.json)
    _emit(args, result, lambda: format_apply_result(result, _now_ms(), erase=rpc == "Erase"))
    return Exit.OK


def _cmd_allow(args: argparse.Namespace) -> int:
    entries = [Entry(a, args.ttl, args.subject, args.port_profile) for a in args.addresses]
    return _apply(args, "Allow", lambda c, rid: c.envelope_allow(entries, rid))


def _cmd_revoke(args: argparse.Namespace) -> int:
    if not args.addresses and not args.subject:
        raise CtlError(
            "bad_arguments",
            "nothing to revoke: give the ADDRESS(es) to revoke, or --subject S for all of S's",
        )
    if args.addresses and args.subject:
        raise CtlError(
            "bad_arguments",
            "give ADDRESS... or --subject, not both (--subject revokes every entry of S)",
        )
    return _apply(
        args,
        "Revoke",
        lambda c, rid: c.envelope_revoke(args.addresses, args.subject, args.port_profile, rid),
    )


def _cmd_sync(args: argparse.Namespace) -> int:
    source = args.file
    fmt = args.format or ("csv" if source.lower().endswith(".csv") else "jsonl")
    if source == "-":
        text = sys.stdin.read()
    else:
        try:
            text = Path(source).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CtlError("unreadable_file", f"{source}: {exc}") from exc
    entries = parse_sync_entries(text, fmt)
    if not entries and not args.allow_empty:
        raise CtlError(
            "empty_sync",
            "the input has no entries; a Sync of nothing removes every dynamic entry on the"
            " agent, pass --allow-empty if that is what you want",
        )
    return _apply(args, "Sync", lambda c, rid: c.envelope_sync(entries, rid))


def _cmd_erase(args: argparse.Namespace) -> int:
    if not args.subject:
        raise CtlError("bad_arguments", "SUBJECT must not be empty")
    return _apply(args, "Erase", lambda c, rid: c.envelope_erase(args.subject, rid))


def _cmd_state(args: argparse.Namespace) -> int:
    with _client(args, signing=False, clock=time.time) as client:
        state = client.state()
    _emit(args, state, lambda: format_state(state, _now_ms()))
    return Exit.OK


def _cmd_watch(args: argparse.Namespace) -> int:
    seen = 0
    with _client(args, signing=False, clock=time.time) as client:
        for event in client.watch(args.since):
            _emit(args, event, functools.partial(format_event, event, _now_ms()))
            seen += 1
            if seen == args.count:
                break
    return Exit.OK


def call_failure(exc: AgentCallError) -> Failure:
    """What a failed call prints and exits with: the agent's reason word when it answered
    (refused), else the transport's words (unreachable, or refused for other codes)."""
    code = exc.code.name
    if _REASON_WORD.fullmatch(exc.reason):
        detail = exc.message.split(":", 1)[1].strip() if ":" in exc.message else ""
        return Failure(exc.reason, detail, Exit.REFUSED, code=code)
    if exc.code in _NO_ANSWER:
        reason = "unreachable" if exc.code == grpc.StatusCode.UNAVAILABLE else "no_answer"
        return Failure(reason, exc.message, Exit.UNREACHABLE, code=code)
    return Failure(code.lower(), exc.message, Exit.REFUSED, code=code)


def _run(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except CtlError as exc:
            return report(Failure(exc.reason, exc.detail, exc.exit_code), json_output=args.json)
        except AgentCallError as exc:
            return report(call_failure(exc), json_output=args.json)
        except KeyboardInterrupt:
            return Exit.INTERRUPTED
        except BrokenPipeError:
            # `ctl watch | head`: the reader left; say nothing more (stdout is gone).
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return Exit.OK

    return run


# --- argument parsing -------------------------------------------------------------------------


def _connection_options() -> argparse.ArgumentParser:
    # SUPPRESS defaults: the options may come before or after the subcommand, and a subparser's
    # default must not overwrite a value given before it.
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group(
        "connection",
        "Each setting comes from the command line, else from the environment variable\n"
        f"{ENV_PREFIX}<NAME> ({ENV_PREFIX}TARGET, {ENV_PREFIX}SIGNING_KEY, ...), else from\n"
        "the connection file: TOML whose keys are the option names with underscores (target,\n"
        "agent_id, ca, cert, key, signing_key, keyid, server_name, timeout); relative paths\n"
        "are read from the file's directory. `vicifast-agent dev-pki DIR` writes DIR/ctl.toml.",
    )
    group.add_argument(
        "--connection",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help=f"TOML connection file with these settings as keys (env {ENV_PREFIX}CONNECTION)",
    )
    for name, text in CONNECTION_KEYS.items():
        group.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            metavar=name.upper(),
            default=argparse.SUPPRESS,
            help=text,
        )
    parent.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable JSON"
    )
    return parent


def _whole(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number in ``low..high`` (the proto field's range)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high}")
        return value

    return parse


_UINT32, _UINT64, _INT64 = 2**32 - 1, 2**64 - 1, 2**63 - 1


def _request_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--request-id",
        help="8-64 of [A-Za-z0-9_-]; default: a fresh random id (printed in the output)",
    )
    p.add_argument(
        "--issued-at",
        type=_whole(0, _INT64),
        metavar="UNIX_MS",
        help="the request's issued_at; with the same --request-id and arguments it resends the"
        " identical request (idempotent retry within its 120 s validity)",
    )


_CHANGE_EPILOG = exit_epilog(
    (Exit.OK, Exit.USAGE, Exit.REFUSED, Exit.UNREACHABLE, Exit.INTERRUPTED),
    {
        Exit.OK: "done (per-entry STALE or NOT_FOUND are results, not failures)",
        Exit.UNREACHABLE: "agent unreachable or no answer in time: the outcome is unknown;"
        " resend with the printed --request-id and --issued-at (safe: applied once)",
    },
)
_READ_EPILOG = exit_epilog((Exit.OK, Exit.USAGE, Exit.REFUSED, Exit.UNREACHABLE, Exit.INTERRUPTED))


def _ttl(text: str) -> int:
    """An argparse type: seconds or a duration with units (``1h``, ``90m``, ``2d``), uint32."""
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds > _UINT32:
        raise argparse.ArgumentTypeError(f"{text!r} is longer than {_UINT32} seconds")
    return seconds


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``ctl`` and its subcommands on the top-level parser."""
    common = _connection_options()
    ctl = sub.add_parser(
        "ctl",
        parents=[common],
        help="control-plane calls to an agent over mTLS (allow, revoke, sync, erase, state, watch)",
        description="Call an agent the way the control plane does: signed requests over mTLS.",
        epilog=_CHANGE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ctl.set_defaults(handler=lambda _args: _help(ctl))
    cmds = ctl.add_subparsers(metavar="COMMAND")

    def command(
        name: str,
        text: str,
        handler: Callable[[argparse.Namespace], int],
        epilog: str = _CHANGE_EPILOG,
    ) -> Any:
        p = cmds.add_parser(name, parents=[common], help=text, description=text, epilog=epilog)
        p.formatter_class = argparse.RawDescriptionHelpFormatter
        p.set_defaults(handler=_with_defaults(_run(handler)))
        return p

    p = command("allow", "admit addresses (or refresh them) for a TTL", _cmd_allow)
    p.add_argument("addresses", nargs="+", metavar="ADDRESS", help="IPv4/IPv6 address or prefix")
    p.add_argument(
        "--ttl",
        type=_ttl,
        default=0,
        metavar="DURATION",
        help="seconds, or with a unit: 90m, 1h, 2d (default 0: the agent's default)",
    )
    p.add_argument("--subject", default="", help="who the entries are for (the VICIdial user)")
    p.add_argument(
        "--profile",
        dest="port_profile",
        metavar="NAME",
        default="",
        help="port profile (default: the agent's default profile)",
    )
    _request_options(p)

    p = command("revoke", "remove addresses, or every entry of a subject", _cmd_revoke)
    p.add_argument("addresses", nargs="*", metavar="ADDRESS")
    p.add_argument("--subject", default="", help="revoke every entry of this subject instead")
    p.add_argument(
        "--profile", dest="port_profile", metavar="NAME", default="", help="only this profile"
    )
    _request_options(p)

    p = command(
        "sync",
        "make the agent's dynamic entries exactly those in FILE (JSON lines or CSV)",
        _cmd_sync,
    )
    p.add_argument(
        "file",
        metavar="FILE",
        help='\'-\' for stdin; JSON lines ({"address": ..., "ttl_seconds": ..., "subject":'
        ' ..., "profile": ...} per line) or CSV with a header row of those names',
    )
    p.add_argument("--format", choices=("jsonl", "csv"), help="default: csv for *.csv, else jsonl")
    p.add_argument(
        "--allow-empty",
        action="store_true",
        help="allow an input without entries (that removes every dynamic entry)",
    )
    _request_options(p)

    p = command("erase", "privacy erasure: revoke a subject and delete its records", _cmd_erase)
    p.add_argument("subject", metavar="SUBJECT")
    _request_options(p)

    command("state", "what the agent enforces now", _cmd_state, _READ_EPILOG)

    p = command("watch", "stream the agent's events until Ctrl-C", _cmd_watch, _READ_EPILOG)
    p.add_argument(
        "--since",
        type=_whole(0, _UINT64),
        default=0,
        metavar="N",
        help="events after state_version N (0: all)",
    )
    p.add_argument("--count", type=_whole(1, _UINT64), metavar="N", help="stop after N events")


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return Exit.USAGE


def _with_defaults(
    handler: Callable[[argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        if not hasattr(args, "json"):
            args.json = False
        return handler(args)

    return run
