"""The ``vicifast-agent`` subcommands for sysadmins and control-plane engineers.

Each command talks to the daemon or reads files; none edits the nftables table behind the
daemon's back. Output is for humans by default and JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from agent import __version__, admin, ctl
from agent.config import DEFAULT_CONFIG_PATH, load_config
from agent.errors import ConfigError
from agent.rpc.signing import trusted_keys_from_config


def _check_config(args: argparse.Namespace) -> int:
    path = Path(args.path)
    try:
        cfg = load_config(path)
        trusted_keys_from_config(cfg.signing.trusted_keys)  # base64 Ed25519 keys, named by key
    except ConfigError as exc:
        if args.json:
            print(
                json.dumps({"ok": False, "path": str(path), "key": exc.key, "error": exc.message})
            )
        else:
            print(f"{path}: INVALID: {exc.detail}", file=sys.stderr)
        return 1
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


def _version(args: argparse.Namespace) -> int:
    print(json.dumps({"version": __version__}) if args.json else f"vicifast-agent {__version__}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vicifast-agent",
        description="Firewall-orchestration agent for VICIdial hosts.",
    )
    sub = parser.add_subparsers(metavar="COMMAND")

    p = sub.add_parser("check-config", help="validate a configuration file")
    p.add_argument("path", nargs="?", default=str(DEFAULT_CONFIG_PATH))
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_check_config)

    p = sub.add_parser("run", help="run the daemon (systemd starts this)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG_PATH))
    p.set_defaults(handler=_run)

    p = sub.add_parser("version", help="print the version")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_version)

    ctl.add_commands(sub)
    admin.add_commands(sub)
    return parser
