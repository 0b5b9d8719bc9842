"""The sysadmin's CLI (status, list, allow, revoke, doctor, why) over the daemon's local socket."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the sysadmin's commands on the top-level parser."""
