"""Write vicifast-agent(1) to stdout from the real argument parser, so it covers every command.

Run by debian/rules at build time (``PYTHONPATH=. python packaging/manpage.py``). Each command's
``--help`` text goes in verbatim: the page cannot drift from the program.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys

os.environ["COLUMNS"] = "78"  # argparse wraps to this; a man page reads best under 80 columns

from agent import __version__
from agent.cli import build_parser
from agent.cli_contract import EXIT_TABLE

_DESCRIPTION = """\
The firewall agent of a VICIfast-hosted VICIdial server. The control plane sends it signed
gRPC requests over mutual TLS; the agent keeps timed nftables allow-sets for call-centre agents'
source addresses in its own table and reports its state and Prometheus metrics.
The daemon is started by systemd (vicifast-agent.service); the other commands are for the
sysadmin and the control-plane engineer."""

_FILES = [
    ("/etc/vicifast-agent/agent.toml", "the configuration, every key commented"),
    ("/etc/vicifast-agent/tls/", "the agent's TLS certificate and key, the client CA"),
    ("/var/lib/vicifast-agent/", "state: entries, request log, audit (mode 0700)"),
    ("/run/vicifast-agent/local.sock", "the local socket the sysadmin's commands use"),
    ("/lib/systemd/system/vicifast-agent.service", "the hardened systemd unit"),
]


def _roff(text: str) -> str:
    """Escape text for a no-fill block: backslashes, and control characters at line starts."""
    lines = []
    for line in text.replace("\\", "\\e").splitlines():
        lines.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(lines)


def _commands(
    parser: argparse.ArgumentParser, prefix: str
) -> list[tuple[str, argparse.ArgumentParser]]:
    """Every (sub)command below ``parser``, depth first, in the parser's order."""
    found = []
    for action in parser._actions:  # argparse has no public walk over subparsers
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                full = f"{prefix} {name}"
                found.append((full, sub))
                found.extend(_commands(sub, full))
    return found


def render() -> str:
    parser = build_parser()
    date = dt.datetime.fromtimestamp(
        int(os.environ.get("SOURCE_DATE_EPOCH", "0")) or dt.datetime.now(dt.UTC).timestamp(),
        dt.UTC,
    ).strftime("%Y-%m-%d")
    out = [
        f'.TH VICIFAST-AGENT 1 "{date}" "vicifast-agent {__version__}" "User Commands"',
        ".SH NAME",
        "vicifast-agent \\- firewall agent for VICIdial hosts",
        ".SH SYNOPSIS",
        ".B vicifast-agent",
        ".I COMMAND",
        "[\\fIOPTIONS\\fR]",
        ".SH DESCRIPTION",
        _DESCRIPTION,
        ".SH COMMANDS",
        ".nf",
        _roff(parser.format_help()),
        ".fi",
    ]
    for name, sub in _commands(parser, "vicifast-agent"):
        out += [".SS " + name, ".nf", _roff(sub.format_help()), ".fi"]
    out.append(".SH FILES")
    for path, what in _FILES:
        out += [".TP", f".I {path}", what]
    out += [
        ".SH EXIT STATUS",
        "One table for every command (the sysadmin's and ctl alike); each command's help",
        "above lists the codes it uses. With --json an error is one object on stdout:",
        '{"error": {"reason": ..., "detail": ..., "code": ..., "exit_code": ...}}.',
    ]
    for code, text in EXIT_TABLE.items():
        out += [f".IP {int(code)}", _roff(text.replace("`", ""))]
    out += [
        ".PP",
        "run (the daemon) exits 0 when stopped, 1 when it cannot start, and 78 when its",
        "state directory cannot be used.",
        ".SH SEE ALSO",
        ".BR systemctl (1),",
        ".BR journalctl (1),",
        ".BR nft (8)",
        "and /usr/share/doc/vicifast-agent/README.md.gz",
        "",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(render())
