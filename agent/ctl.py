"""``vicifast-agent ctl``: the control-plane engineer's CLI over the real client library."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``ctl`` and its subcommands on the top-level parser."""
