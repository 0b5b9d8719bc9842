"""A flood of idle connections to the agent's API port, as one process inside its namespace.

Owns its own sockets only, and sends nothing but TCP connections (optionally the first bytes of a
TLS ClientHello) to the target it is given, from loopback source addresses of the namespace it
runs in. ``python -m bench.flood PARAMS_JSON`` keeps ``count`` connections open from its side:
those the agent closes (over its caps, or at its handshake timeout) are opened again at the next
sweep, as an attacker's would be. It prints ``ready`` once the first ``count`` are made, runs
until its stdin closes (or ``seconds`` pass), then prints one JSON line of what it saw.

``Flood`` is what ``bench.rpc`` and ``bench.soak`` start and stop.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from agent.devlab import closed_by_peer
from bench.netns import REPO_ROOT

SWEEP_S = 1.0


def sources(count: int, per_source: int) -> list[str]:
    """``count // per_source`` loopback addresses 127.0.1.1, 127.0.1.2, ... (each a source)."""
    n = max(1, -(-count // per_source))
    return [f"127.0.{1 + i // 250}.{1 + i % 250}" for i in range(n)]


def flood(params: dict[str, Any]) -> dict[str, Any]:
    host, port = params["target"]
    count, per_source = params["count"], params["per_source"]
    first_bytes = bytes.fromhex(params.get("first_bytes", ""))
    addrs = sources(count, per_source)
    slots: list[tuple[str, socket.socket | None]] = [
        (addrs[i // per_source], None) for i in range(count)
    ]
    made = reopened = failed = 0
    held_min, held_max = count, 0
    deadline = time.monotonic() + params.get("seconds", 3600)

    def connect(src: str) -> socket.socket | None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind((src, 0))
            s.connect((host, port))
            if first_bytes:
                s.sendall(first_bytes)
        except OSError:
            s.close()
            return None
        return s

    announced = False
    while time.monotonic() < deadline:
        held = 0
        for i, (src, s) in enumerate(slots):
            if s is not None and not closed_by_peer(s):
                held += 1
                continue
            if s is not None:
                s.close()
                reopened += 1
            fresh = connect(src)
            failed += fresh is None
            made += fresh is not None
            slots[i] = (src, fresh)
        if announced:
            held_min, held_max = min(held_min, held), max(held_max, held)
        else:
            print("ready", flush=True)
            announced = True
        ready, _, _ = select.select([sys.stdin], [], [], SWEEP_S)
        if ready and not sys.stdin.readline():
            break  # stdin closed: the caller is done
    for _, s in slots:
        if s is not None:
            s.close()
    return {
        "connects": made,
        "reopened": reopened,
        "connect_failures": failed,
        "held_min": held_min,
        "held_max": held_max,
    }


@dataclass
class Flood:
    """``count`` idle connections to ``target`` held from inside ``netns`` while in use."""

    netns: str
    target: tuple[str, int]
    count: int = 2000
    per_source: int = 50
    first_bytes: bytes = b""
    seconds: float = 3600
    result: dict[str, Any] = field(default_factory=dict)
    _proc: subprocess.Popen[str] | None = field(default=None, repr=False)

    def __enter__(self) -> Flood:
        params = {
            "target": list(self.target),
            "count": self.count,
            "per_source": self.per_source,
            "first_bytes": self.first_bytes.hex(),
            "seconds": self.seconds,
        }
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        argv = ["ip", "netns", "exec", self.netns, sys.executable, "-m", "bench.flood"]
        self._proc = subprocess.Popen(
            [*argv, json.dumps(params)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO_ROOT,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().strip()
        if line != "ready":
            self._proc.kill()
            raise RuntimeError(f"bench.flood did not start: {line!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        proc = self._proc
        assert proc is not None
        assert proc.stdin is not None
        assert proc.stdout is not None
        proc.stdin.close()
        out = proc.stdout.read()
        proc.wait(timeout=60)
        lines = out.strip().splitlines()
        self.result = json.loads(lines[-1]) if lines else {}


def main() -> int:
    print(json.dumps(flood(json.loads(sys.argv[1]))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
