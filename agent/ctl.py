"""``vicifast-agent ctl``: the control-plane engineer's CLI over the real client library.

Owns the ``ctl`` commands (allow, revoke, sync, erase, state, watch), how they find their
connection settings, their human and JSON output, and their exit codes. It builds, signs and
sends requests only through ``agent.rpc.client.AgentClient``; it must never speak TLS, sign, or
touch nftables itself.

Connection settings, first found wins: the command line (``--target`` ...), then environment
variables ``VICIFAST_CTL_<OPTION>`` (``VICIFAST_CTL_TARGET``, ``VICIFAST_CTL_SIGNING_KEY`` ...),
then a connection file (``--connection FILE`` or ``VICIFAST_CTL_CONNECTION``): TOML with the
options' names as keys (``target``, ``agent_id``, ``ca``, ``cert``, ``key``, ``signing_key``,
``keyid``, ``server_name``, ``timeout``), relative paths read from the file's directory.
``vicifast-agent dev-pki`` writes one (``ctl.toml``) next to its dev material.

Exit codes: 0 done (per-entry outcomes such as STALE or NOT_FOUND are results, not failures);
1 the agent refused the request (``error: CODE reason_word: detail`` on stderr); 2 usage or
local problem (bad arguments, unreadable files: argparse's own convention); 3 the agent could
not be reached or did not answer in time, so the outcome of a change is unknown and the printed
``--request-id``/``--issued-at`` resend the identical, idempotent request; 130 interrupted.
"""

from __future__ import annotations

import argparse
import csv
import enum
import functools
import io
import json
import os
import re
import sys
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf import json_format
from google.protobuf.message import Message

from agent.rpc.client import AgentCallError, AgentClient, ClientIdentity, Entry
from agent.rpc.pb import agent_pb2
from agent.rpc.signing import keyid_for, new_request_id, private_key_from_pem
from agent.terminal import printable, span, table, utc_iso

__all__ = [
    "CONNECTION_KEYS",
    "ENV_PREFIX",
    "Connection",
    "CtlError",
    "Exit",
    "add_commands",
    "connection_file_text",
    "format_apply_result",
    "format_event",
    "format_state",
    "parse_sync_entries",
    "resolve_connection",
    "to_json",
]

ENV_PREFIX = "VICIFAST_CTL_"
DEFAULT_TIMEOUT_S = 10.0
# Connection settings: name -> help. Each is --name-with-dashes, VICIFAST_CTL_NAME, file key.
CONNECTION_KEYS: dict[str, str] = {
    "target": "the agent's gRPC address, host:port",
    "agent_id": "the agent's configured agent_id (the signed requests' audience)",
    "ca": "PEM CA certificate that signed the agent's server certificate",
    "cert": "PEM mTLS client certificate of the control plane",
    "key": "PEM private key of that client certificate",
    "signing_key": "PEM Ed25519 request-signing key (allow, revoke, sync, erase)",
    "keyid": "key id the agent trusts the signing key under (default: derived from the key)",
    "server_name": "TLS name to verify the agent's certificate against (default: target host)",
    "timeout": f"seconds per call (default {DEFAULT_TIMEOUT_S:g})",
}
_PATH_KEYS = frozenset({"ca", "cert", "key", "signing_key"})
_REQUIRED = ("target", "agent_id", "ca", "cert", "key")
# The agent's status messages start with a snake_case reason word; anything else came from the
# gRPC transport (no connection, TLS handshake failed, deadline), not from the agent.
_REASON_WORD = re.compile(r"[a-z][a-z0-9_]*")
_NO_ANSWER = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
_SYNC_FIELDS = ("address", "ttl_seconds", "subject", "profile")


class Exit(enum.IntEnum):
    OK = 0
    REFUSED = 1
    USAGE = 2
    UNREACHABLE = 3
    INTERRUPTED = 130


class CtlError(Exception):
    """A problem on this side (settings, files, input): reason word, detail, exit code."""

    def __init__(self, reason: str, detail: str, exit_code: Exit = Exit.USAGE) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.exit_code = exit_code


# --- connection settings ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connection:
    """Where the agent is and what this caller presents to it."""

    target: str
    agent_id: str
    ca: Path
    cert: Path
    key: Path
    signing_key: Path | None = None
    keyid: str | None = None
    server_name: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise CtlError("bad_setting", "timeout must be a positive number of seconds")

    def identity(self, *, signing: bool) -> ClientIdentity:
        """Read the key material; ``signing`` requires the signing key."""
        if self.signing_key is None:
            if signing:
                raise CtlError("missing_setting", _missing_help("signing_key"))
            # Reads are authorised by mTLS alone; the client type still wants a key, which a
            # read never uses, so a throw-away one stands in.
            signer, keyid = Ed25519PrivateKey.generate(), ""
        else:
            try:
                signer = private_key_from_pem(_read(self.signing_key, "signing_key"))
            except ValueError as exc:
                raise CtlError("bad_signing_key", f"{self.signing_key}: {exc}") from exc
            keyid = self.keyid or keyid_for(signer.public_key())
        return ClientIdentity(
            ca_cert=_read(self.ca, "ca"),
            client_cert=_read(self.cert, "cert"),
            client_key=_read(self.key, "key"),
            signing_key=signer,
            keyid=keyid,
        )


def _read(path: Path, name: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CtlError("unreadable_file", f"{name} {path}: {exc.strerror or exc}") from exc


def _missing_help(name: str) -> str:
    return (
        f"{name} is not set: use --{name.replace('_', '-')}, {ENV_PREFIX}{name.upper()}"
        " or a connection file (--connection)"
    )


def _load_connection_file(path: Path) -> dict[str, str]:
    try:
        data = tomllib.loads(_read(path, "connection file").decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise CtlError("bad_connection_file", f"{path}: {exc}") from exc
    out: dict[str, str] = {}
    for name, raw in data.items():
        if name not in CONNECTION_KEYS:
            known = ", ".join(CONNECTION_KEYS)
            raise CtlError("bad_connection_file", f"{path}: unknown key {name!r} (known: {known})")
        number = isinstance(raw, int | float) and not isinstance(raw, bool)
        value = str(raw) if name == "timeout" and number else raw
        if not isinstance(value, str):
            raise CtlError("bad_connection_file", f"{path}: {name} must be a string")
        # A relative path is the file's neighbour; an absolute one stays as it is.
        out[name] = str(path.parent / value) if name in _PATH_KEYS and value else value
    return out


def resolve_connection(
    options: Mapping[str, str | None], env: Mapping[str, str], *, connection_file: str | None
) -> Connection:
    """Merge command line ``options``, then ``env``, then the connection file, into settings."""
    file_path = connection_file or env.get(f"{ENV_PREFIX}CONNECTION") or None
    from_file = _load_connection_file(Path(file_path)) if file_path else {}
    merged: dict[str, str] = {}
    for name in CONNECTION_KEYS:
        value = options.get(name) or env.get(f"{ENV_PREFIX}{name.upper()}") or from_file.get(name)
        if value:
            merged[name] = value
    for name in _REQUIRED:
        if name not in merged:
            raise CtlError("missing_setting", _missing_help(name))
    try:
        timeout = float(merged.get("timeout", DEFAULT_TIMEOUT_S))
    except ValueError as exc:
        raise CtlError("bad_setting", f"timeout {merged['timeout']!r} is not a number") from exc
    signing_key = merged.get("signing_key")
    return Connection(
        target=merged["target"],
        agent_id=merged["agent_id"],
        ca=Path(merged["ca"]),
        cert=Path(merged["cert"]),
        key=Path(merged["key"]),
        signing_key=Path(signing_key) if signing_key else None,
        keyid=merged.get("keyid"),
        server_name=merged.get("server_name"),
        timeout_s=timeout,
    )


def connection_file_text(settings: Mapping[str, str], *, comment: str = "") -> str:
    """A connection file for ``settings`` (keys from ``CONNECTION_KEYS``)."""
    lines = [f"# {line}" for line in comment.splitlines()]
    lines.append("# vicifast-agent ctl --connection THIS_FILE ...")
    for name, value in settings.items():
        if name not in CONNECTION_KEYS:
            raise ValueError(f"unknown connection setting {name!r}")
        lines.append(f"{name} = {json.dumps(value)}")  # a JSON string is a TOML basic string
    return "\n".join(lines) + "\n"


# --- input for sync ---------------------------------------------------------------------------


def parse_sync_entries(text: str, fmt: str) -> list[Entry]:
    """Entries from JSON lines (``jsonl``: one object per line) or ``csv`` (header row).

    Fields: ``address`` (required), ``ttl_seconds`` (0 or absent: the agent's default),
    ``subject``, ``profile``; other fields are refused. Blank lines are skipped.
    """
    if fmt == "jsonl":
        return [_entry(row, f"line {n}") for n, row in _json_lines(text)]
    if fmt == "csv":
        return _csv_entries(text)
    raise ValueError(f"unknown format {fmt!r}")


def _json_lines(text: str) -> Iterable[tuple[int, Mapping[str, Any]]]:
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CtlError("bad_input", f"line {n}: not JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise CtlError("bad_input", f"line {n}: expected a JSON object")
        yield n, row


def _csv_entries(text: str) -> list[Entry]:
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    unknown = [f for f in header if f not in _SYNC_FIELDS]
    if unknown or "address" not in header:
        raise CtlError(
            "bad_input",
            f"CSV header must name address and optionally {', '.join(_SYNC_FIELDS[1:])};"
            f" got {','.join(header)}",
        )
    entries = []
    for row in reader:
        values = {k: v for k, v in row.items() if k is not None and v not in (None, "")}
        if None in row:
            raise CtlError("bad_input", f"line {reader.line_num}: more cells than the header")
        if values:
            entries.append(_entry(values, f"line {reader.line_num}"))
    return entries


def _entry(row: Mapping[str, Any], where: str) -> Entry:
    unknown = sorted(set(row) - set(_SYNC_FIELDS))
    if unknown:
        raise CtlError("bad_input", f"{where}: unknown field {unknown[0]!r}")
    address, subject, profile = (row.get(k, "") for k in ("address", "subject", "profile"))
    if not isinstance(address, str) or not address:
        raise CtlError("bad_input", f"{where}: address is required")
    if not isinstance(subject, str) or not isinstance(profile, str):
        raise CtlError("bad_input", f"{where}: subject and profile must be strings")
    ttl = row.get("ttl_seconds", 0)
    if isinstance(ttl, str) and ttl.isdigit():
        ttl = int(ttl)
    if not isinstance(ttl, int) or isinstance(ttl, bool) or not 0 <= ttl < 2**32:
        raise CtlError("bad_input", f"{where}: ttl_seconds must be a whole number of seconds")
    return Entry(address, ttl, subject, profile)


# --- output -----------------------------------------------------------------------------------


def to_json(message: Message) -> dict[str, Any]:
    """Proto field names, every field (defaults too), enum names, 64-bit ints as numbers."""
    out: dict[str, Any] = json_format.MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        unquote_int64_if_possible=True,
    )
    return out


def when(ms: int, now_ms: int) -> str:
    """``2025-01-02T03:04:05Z (in 9m 59s)`` / ``(... ago)``; ``-`` for 0 (no time)."""
    if ms <= 0:
        return "-"
    delta = (ms - now_ms) // 1000 if ms >= now_ms else -((now_ms - ms) // 1000)
    rel = "now" if delta == 0 else f"in {span(delta)}" if delta > 0 else f"{span(-delta)} ago"
    return f"{utc_iso(ms)} ({rel})"


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
    count = len(state.entries)
    lines.append(
        f"state        version {state.state_version}, {count} entr{'y' if count == 1 else 'ies'}"
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


# --- commands ---------------------------------------------------------------------------------


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
            "hint: the agent may or may not have applied it; resend the identical request with"
            f" the same arguments plus --request-id {self.request_id}"
            f" --issued-at {self.issued_at_ms}: the agent applies a request once and answers a"
            " resend with the original result"
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
            line, code = describe_call_error(exc)
            _print_err(line)
            if code == Exit.UNREACHABLE:
                _print_err(pinned.retry_hint())
            return code
    _emit(args, result, lambda: format_apply_result(result, _now_ms(), erase=rpc == "Erase"))
    return Exit.OK


def _cmd_allow(args: argparse.Namespace) -> int:
    entries = [Entry(a, args.ttl, args.subject, args.port_profile) for a in args.addresses]
    return _apply(args, "Allow", lambda c, rid: c.envelope_allow(entries, rid))


def _cmd_revoke(args: argparse.Namespace) -> int:
    if bool(args.addresses) == bool(args.subject):
        raise CtlError("bad_arguments", "give addresses or --subject, not both and not neither")
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


def describe_call_error(exc: AgentCallError) -> tuple[str, Exit]:
    """The stderr line and exit code for a failed call."""
    if _REASON_WORD.fullmatch(exc.reason):
        detail = exc.message.split(":", 1)[1].strip() if ":" in exc.message else ""
        line = f"error: {exc.code.name} {exc.reason}"
        return (f"{line}: {detail}" if detail else line), Exit.REFUSED
    if exc.code in _NO_ANSWER:
        reason = "unreachable" if exc.code == grpc.StatusCode.UNAVAILABLE else "no_answer"
        return f"error: {exc.code.name} {reason}: {exc.message}", Exit.UNREACHABLE
    return f"error: {exc.code.name} {exc.code.name.lower()}: {exc.message}", Exit.REFUSED


def _run(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except CtlError as exc:
            _print_err(f"error: {exc.reason}: {exc.detail}")
            return exc.exit_code
        except AgentCallError as exc:
            line, code = describe_call_error(exc)
            _print_err(line)
            return code
        except KeyboardInterrupt:
            return Exit.INTERRUPTED
        except BrokenPipeError:
            # `ctl watch | head`: the reader left; say nothing more (stdout is gone).
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return Exit.OK

    return run


def _print_err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


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


_EPILOG = """\
exit codes: 0 done; 1 refused by the agent (stderr: error: CODE reason_word: detail);
2 usage or local problem; 3 agent unreachable or no answer in time (a change's outcome is
unknown: resend with the printed --request-id and --issued-at); 130 interrupted.
"""


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``ctl`` and its subcommands on the top-level parser."""
    common = _connection_options()
    ctl = sub.add_parser(
        "ctl",
        parents=[common],
        help="control-plane calls to an agent over mTLS (allow, revoke, sync, erase, state, watch)",
        description="Call an agent the way the control plane does: signed requests over mTLS.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ctl.set_defaults(handler=lambda _args: _help(ctl))
    cmds = ctl.add_subparsers(metavar="COMMAND")

    def command(name: str, text: str, handler: Callable[[argparse.Namespace], int]) -> Any:
        p = cmds.add_parser(name, parents=[common], help=text, description=text, epilog=_EPILOG)
        p.formatter_class = argparse.RawDescriptionHelpFormatter
        p.set_defaults(handler=_with_defaults(_run(handler)))
        return p

    p = command("allow", "admit addresses (or refresh them) for a TTL", _cmd_allow)
    p.add_argument("addresses", nargs="+", metavar="ADDRESS", help="IPv4/IPv6 address or prefix")
    p.add_argument(
        "--ttl", type=_whole(0, _UINT32), default=0, help="seconds (default 0: the agent's default)"
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

    command("state", "what the agent enforces now", _cmd_state)

    p = command("watch", "stream the agent's events until Ctrl-C", _cmd_watch)
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
