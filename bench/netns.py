"""Scratch network namespaces for benches, and workers that run inside them.

Owns only the namespaces it creates (``vf-bench-<hex>``) and deletes them on exit; it never
touches the host namespace's links, addresses or ruleset. A worker is a fresh
``python -m <module>`` started with ``ip netns exec``, so its libnftables context, its sockets
and its RSS are those of a process living in the namespace; it prints one JSON object as the
last line of its stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from agent.devlab import scratch_netns

__all__ = ["run_worker", "scratch_netns", "worker_main"]

REPO_ROOT = Path(__file__).resolve().parent.parent


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


def worker_main(
    module: str,
    scenarios: Mapping[str, Callable[[dict[str, Any]], dict[str, Any]]],
    argv: Sequence[str] | None = None,
) -> int:
    """A worker's entry point: ``SCENARIO PARAMS_JSON`` in, one JSON line out (``run_worker``)."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}")
    parser.add_argument("scenario", choices=sorted(scenarios))
    parser.add_argument("params", help="JSON object: the scenario's parameters")
    args = parser.parse_args(argv)
    print(json.dumps(scenarios[args.scenario](json.loads(args.params))), flush=True)
    return 0
