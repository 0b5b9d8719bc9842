"""Worker of ``bench.daemon``, run inside the agent's namespace: ``python -m bench.daemon_worker
SCENARIO JSON``.

Owns nothing it keeps: it flushes the namespace's ruleset (the drift a sysadmin causes) and
watches the agent's set come back through its own libnftables context. It measures, it does not
judge: it prints raw timings as one JSON line.

Scenario ``drift``: ``nft flush ruleset``, then the time until the agent's allow set holds all
of its entries again. The set is watched with a cheap single-element lookup of one of the
entries (every 5 ms), and the restore is checked complete with a full count right after that
lookup first succeeds; if the count is short, full counts continue and the first complete one
is the time. A repair that does not happen within the deadline is reported as ``null``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import nftables  # Debian's python3-nftables

from agent.rules.render import allow_set
from bench.netns import worker_main
from bench.rpc_worker import PROFILE, address

POLL_S = 0.005


class Kernel:
    """The namespace's ruleset through libnftables, made in (so talking to) this namespace."""

    def __init__(self, table: str) -> None:
        self.nft = nftables.Nftables()
        self.nft.set_json_output(True)
        self.set_ref = f"inet {table} {allow_set(PROFILE, 4)}"

    def run(self, command: str) -> tuple[int, str]:
        rc, out, _ = self.nft.cmd(command)
        return rc, out

    def has(self, element: str) -> bool:
        rc, _ = self.run(f"get element {self.set_ref} {{ {element} }}")
        return rc == 0

    def count(self) -> int:
        rc, out = self.run(f"list set {self.set_ref}")
        if rc != 0:
            return 0
        for item in json.loads(out)["nftables"]:
            if "set" in item:
                return len(item["set"].get("elem", []))
        return 0


def wait_repaired(
    kernel: Kernel, probe: str, expected: int, started: float, deadline_s: float
) -> float | None:
    """Seconds from ``started`` until the set holds ``expected`` elements again, or None."""
    while time.perf_counter() - started < deadline_s:
        if kernel.has(probe):
            seen = time.perf_counter() - started
            if kernel.count() >= expected:
                return seen
            break
        time.sleep(POLL_S)
    while time.perf_counter() - started < deadline_s:
        if kernel.count() >= expected:
            return time.perf_counter() - started
        time.sleep(POLL_S)
    return None


def scenario_drift(p: dict[str, Any]) -> dict[str, Any]:
    kernel = Kernel(p["table"])
    expected, repeats = p["count"], p["repeats"]
    probe = address(p["first"] + expected - 1)
    if (before := kernel.count()) != expected:
        raise RuntimeError(f"the set holds {before} elements before the drift, not {expected}")
    repairs: list[float | None] = []
    for _ in range(repeats):
        started = time.perf_counter()
        rc, _ = kernel.run("flush ruleset")
        if rc != 0:
            raise RuntimeError("nft flush ruleset failed")
        took = wait_repaired(kernel, probe, expected, started, p["deadline_s"])
        repairs.append(took)
        if took is None:
            break  # the table is gone for good; later repeats would measure nothing
    return {"repairs_s": repairs, "count": expected}


SCENARIOS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"drift": scenario_drift}


def main(argv: list[str] | None = None) -> int:
    return worker_main("bench.daemon_worker", SCENARIOS, argv)


if __name__ == "__main__":
    sys.exit(main())
