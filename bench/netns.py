"""Scratch network namespaces for benches, and workers that run inside them.

Owns only the namespaces it creates (``vf-bench-<hex>``) and deletes them on exit; it never
touches the host namespace's links, addresses or ruleset. A worker is a fresh
``python -m <module>`` started with ``ip netns exec``, so its libnftables context, its sockets
and its RSS are those of a process living in the namespace; it prints one JSON object as the
last line of its stdout.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def scratch_netns(prefix: str = "vf-bench") -> Iterator[str]:
    """A fresh namespace with only ``lo`` (up); deleted on exit whatever happened."""
    name = f"{prefix}-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def run_worker(netns: str, module: str, *args: str, timeout: float = 600) -> dict[str, Any]:
    """Run ``python -m module args`` in ``netns``; return the JSON object it printed last."""
    path = os.environ.get("PYTHONPATH", "")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), path) if p)}
    argv = ["ip", "netns", "exec", netns, sys.executable, "-m", module, *args]
    proc = subprocess.run(
        argv, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"{module} {' '.join(args)} printed nothing:\n{proc.stderr}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result
