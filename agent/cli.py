"""The ``vicifast-agent`` subcommands for sysadmins and control-plane engineers.

Each command talks to the daemon or reads files; none edits the nftables table behind the
daemon's back. Output is for humans by default and JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import grp
import json
import os
import sys
from pathlib import Path
from typing import cast

from agent import __version__, admin
from agent.cli_contract import EXIT_TABLE, CliParser, Exit, Failure, exit_epilog, report
from agent.config import DEFAULT_CONFIG_PATH, load_config
from agent.ctl.commands import add_commands as add_ctl_commands
from agent.ctl.connection import connection_file_text
from agent.errors import ConfigError
from agent.preflight import readiness_problems, service_user
from agent.rpc.signing import trusted_keys_from_config


def _check_config(args: argparse.Namespace) -> int:
    """0: the file is valid and ready to serve; 1: it is not (every problem named on stderr)."""
    path = Path(args.path)
    problems: list[ConfigError] = []
    note = ""
    try:
        cfg = load_config(path)
        trusted_keys_from_config(cfg.signing.trusted_keys)  # base64 Ed25519 keys, named by key
        if not args.syntax_only:
            user = service_user(args.user)
            note = user.note
            problems = readiness_problems(cfg, user)
    except ConfigError as exc:
        problems = [exc]
    if note:
        print(f"vicifast-agent check-config: {note}", file=sys.stderr)
    if problems:
        first = problems[0]
        if args.json:
            failure = Failure(first.reason, first.detail, Exit.NO, extra={"key": first.key})
            listed = [{"key": p.key, "error": p.message} for p in problems]
            print(
                json.dumps(
                    {"ok": False, "path": str(path), **failure.to_json(), "problems": listed}
                )
            )
        else:
            for p in problems:
                print(f"{path}: INVALID: {p.detail}", file=sys.stderr)
        return Exit.NO
    summary = {
        "ok": True,
        "path": str(path),
        "agent_id": cfg.agent_id,
        "table": f"inet {cfg.firewall.table}",
        "profiles": {p.name: [str(r) for r in p.ports] for p in cfg.firewall.profiles},
        "default_profile": cfg.default_profile,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{path}: OK (agent_id {cfg.agent_id}, table inet {cfg.firewall.table})")
        for name, ports in summary["profiles"].items():  # type: ignore[attr-defined]
            print(f"  profile {name}: {', '.join(ports)}")
    return 0


def _run(args: argparse.Namespace) -> int:
    # Lazy: the daemon's imports (grpc, sqlite) stay out of the quick commands.
    from agent.daemon import run  # noqa: PLC0415

    return run(Path(args.config))


def _dev_pki(args: argparse.Namespace) -> int:
    # Lazy: key generation pulls in the x509 machinery the other commands never need.
    from agent.devpki import (  # noqa: PLC0415
        DEFAULT_LISTEN,
        DEV_ONLY,
        connect_target,
        make_dev_pki,
    )

    group, gid = _service_group(args.group)
    try:
        material = make_dev_pki(
            args.directory,
            args.agent_id,
            validity_days=args.days,
            listen=args.listen,
            key_gid=gid,
        )
    except OSError as exc:
        failure = Failure("unwritable", f"{args.directory}: {exc.strerror or exc}", Exit.USAGE)
        return report(failure, json_output=args.json)
    target = args.target or connect_target(args.listen or DEFAULT_LISTEN)
    connection = material.directory / "ctl.toml"
    connection.write_text(
        connection_file_text(
            {
                "target": target,
                "agent_id": material.agent_id,
                "ca": material.ca_cert.name,
                "cert": material.client.cert.name,
                "key": material.client.key.name,
                "signing_key": material.signing.key.name,
                "keyid": material.signing.keyid,
            },
            comment=f"{DEV_ONLY}: the dev control plane's connection to agent {material.agent_id}",
        )
    )
    files = {
        "ca_cert": (material.ca_cert, "the agent's client CA; callers verify the agent with it"),
        "ca_key": (material.ca_key, "the dev CA's private key"),
        "server_cert": (material.server.cert, "the agent's server certificate"),
        "server_key": (
            material.server.key,
            f"its private key, mode 0640, group {group}"
            if group
            else "its private key, mode 0640 (no service group: see --group)",
        ),
        "client_cert": (material.client.cert, "the control plane's mTLS client certificate"),
        "client_key": (material.client.key, "its private key"),
        "signing_key": (material.signing.key, "the control plane's Ed25519 signing key"),
        "config_snippet": (material.config_snippet, "the agent's [api] and trusted keys"),
        "ctl_connection": (connection, "settings for vicifast-agent ctl --connection"),
    }
    warning = f"{DEV_ONLY}: throw-away keys and certificates for demos and tests; never deploy them"
    if args.json:
        print(warning, file=sys.stderr)
        summary = {
            "dev_only": True,
            "warning": warning,
            "directory": str(material.directory),
            "agent_id": material.agent_id,
            "keyid": material.signing.keyid,
            "public_key": material.signing.public_b64,
            "listen": args.listen,
            "target": target,
            "server_key_group": group,
            "files": {name: str(path) for name, (path, _) in files.items()},
        }
        print(json.dumps(summary))
        return 0
    print(f"*** {warning} ***")
    width = max(len(str(path)) for path, _ in files.values())
    for path, what in files.values():
        print(f"wrote {str(path).ljust(width)}  {what}")
    print(f"signing keyid {material.signing.keyid}")
    listens = f"[api] listen = {args.listen}" if args.listen else "no [api] listen (default)"
    print(
        f"config snippet: {material.config_snippet} ({listens};"
        f' add agent_id = "{material.agent_id}" and your [firewall]/[state] tables)'
    )
    print(f"ctl connection: vicifast-agent ctl --connection {connection} state")
    print(f"*** {DEV_ONLY} ***")
    return 0


def _service_group(name: str) -> tuple[str | None, int | None]:
    """The group to give server.key (name and gid), or (None, None) when there is no such group
    or this user may not give files to it."""
    if not name:
        return None, None
    try:
        gid = grp.getgrnam(name).gr_gid
    except KeyError:
        return None, None
    if os.geteuid() != 0 and gid not in os.getgroups():
        return None, None
    return name, gid


def _listen(text: str) -> str:
    """An argparse type: ``HOST:PORT`` as ``[api] listen`` takes it."""
    from agent.config import parse_config  # noqa: PLC0415

    try:
        parse_config(f'agent_id = "x"\n[api]\nlisten = {json.dumps(text)}\n')
    except ConfigError as exc:
        if exc.key == "api.listen":
            raise argparse.ArgumentTypeError(exc.detail) from None
    return text


def _version(args: argparse.Namespace) -> int:
    print(json.dumps({"version": __version__}) if args.json else f"vicifast-agent {__version__}")
    return 0


_TOP_EPILOG = exit_epilog(
    tuple(EXIT_TABLE),
    heading="exit status of every command (each COMMAND --help lists its own):",
    footer="run (the daemon): 0 stopped, 1 cannot start, 78 state directory unusable.",
)


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(
        prog="vicifast-agent",
        description="Firewall-orchestration agent for VICIdial hosts.",
        epilog=_TOP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vicifast-agent {__version__}")
    # Subcommands are CliParsers too (argparse makes them of the parent's class).
    sub = cast(
        "argparse._SubParsersAction[argparse.ArgumentParser]",
        parser.add_subparsers(metavar="COMMAND"),
    )

    p = sub.add_parser(
        "check-config",
        help="validate a configuration file and what it names",
        description="Validate the configuration the way the daemon loads it (the unit runs this"
        " before every start), then check that it can serve: agent_id is not the example's"
        " placeholder, at least one trusted signing key, the TLS files readable by the daemon's"
        " user (run as root, the check reads them as that user: vicifast-agent, or --user), the"
        " server key matching its certificate, private keys neither readable nor writable by"
        " others. Each problem is named with its key and the fix.",
        epilog=exit_epilog(
            (Exit.OK, Exit.NO, Exit.USAGE), {Exit.NO: "not ready (each problem names its key)"}
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", nargs="?", default=str(DEFAULT_CONFIG_PATH))
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--user",
        help="check file access as this user (default: vicifast-agent when run by root and it "
        "exists, else the caller)",
    )
    p.add_argument(
        "--syntax-only",
        action="store_true",
        help="only parse and validate the file's keys and values (e.g. the commented example)",
    )
    p.set_defaults(handler=_check_config)

    p = sub.add_parser(
        "run",
        help="run the daemon (systemd starts this)",
        description="Run the daemon in the foreground. Under systemd it logs to the journal"
        " with structured fields; otherwise to stderr, each line followed by those fields.",
        epilog="exit status:\n    0  stopped (SIGTERM)\n    1  cannot start (the log says why)\n"
        "   78  the state directory cannot be used (not restarted by the unit)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default=str(DEFAULT_CONFIG_PATH))
    p.set_defaults(handler=_run)

    p = sub.add_parser(
        "dev-pki",
        help="DEV/TEST ONLY: write a throw-away CA, mTLS certificates, a signing key, configs",
        description="DEV/TEST ONLY. Writes client-ca.crt/client-ca.key, server.crt/server.key,"
        " client.crt/client.key, signing.key, config-snippet.toml (the agent's [api] and"
        " [signing.trusted_keys]) and ctl.toml (a `ctl --connection` file) into DIRECTORY,"
        " named as the README's install steps name them (DIRECTORY may be"
        " /etc/vicifast-agent/tls). Existing files of these names are replaced. Never use this"
        " material in production.",
        epilog=exit_epilog((Exit.OK, Exit.USAGE)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("directory", metavar="DIRECTORY")
    p.add_argument("--agent-id", default="dev-agent", help="the agent's id (default dev-agent)")
    p.add_argument("--days", type=int, default=30, help="certificate validity (default 30)")
    p.add_argument(
        "--listen",
        type=_listen,
        metavar="HOST:PORT",
        help="the agent's [api] listen, written into config-snippet.toml (default: none, the"
        " agent's default [::]:7443); an IP address also goes into the server certificate",
    )
    p.add_argument(
        "--target",
        help="the agent's address written into ctl.toml (default: --listen's, a wildcard host"
        " as loopback: 127.0.0.1:7443 for 0.0.0.0:7443, [::1]:7443 for [::]:7443)",
    )
    p.add_argument(
        "--group",
        default="vicifast-agent",
        help="give server.key (mode 0640) to this group so the daemon, running as the service"
        " user, can read it (default vicifast-agent, if it exists and you may)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_dev_pki)

    p = sub.add_parser(
        "version",
        help="print the version (also: vicifast-agent --version)",
        description="Print this program's version; `status` shows the running daemon's.",
        epilog=exit_epilog((Exit.OK, Exit.USAGE)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_version)

    add_ctl_commands(sub)
    admin.add_commands(sub)
    return parser
