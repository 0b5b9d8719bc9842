"""Worker of ``bench.kernel``, run inside a scratch namespace: ``python -m bench.kernel_worker``.

Owns the agent table of its own namespace and nothing else (only 198.18.0.0/15 addresses, no
traffic). It measures, it does not judge: it prints raw timings and RSS readings as one JSON
line and leaves medians, ratios and targets to ``bench.kernel``.

Scenarios (one per process, so each starts from a fresh heap):

* ``memory`` - RSS before, at the peak of, and after adding 100,000 entries in one transaction,
  then the peak of reading them back;
* ``speed``  - the agent's rules layer against raw ``nft -f`` of the same statements, each pair
  measured back to back (alternating which goes first) so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from agent.config import parse_config
from agent.model import Element, EntryKey
from agent.policy import normalize_address
from agent.rules import render
from agent.rules.nft import NftAdapter
from agent.rules.table import FirewallTable

BULK = 100_000
REFRESH = 10_000
SINGLE_ADDS = 200
BULK_REPEATS = 5
REFRESH_REPEATS = 5
READBACK_REPEATS = 5
PROFILE = "agent"
FIRST_ADDRESS = ipaddress.IPv4Address("198.18.0.1")  # 198.18.0.0/15 holds 131,072 addresses

CONFIG = """
agent_id = "bench"
[firewall]
permit_test_ranges = true
set_size_ipv4 = 262144
set_size_ipv6 = 1024
"""


# --- the table and its entries ---------------------------------------------------------------


def make_table() -> FirewallTable:
    cfg = parse_config(CONFIG)
    table = FirewallTable(cfg.firewall, NftAdapter())
    table.install()
    return table


def allow_set_ref(table: FirewallTable) -> dict[str, str]:
    return {"family": render.FAMILY, "table": table.cfg.table, "name": render.allow_set(PROFILE, 4)}


def flush_allow_set(table: FirewallTable) -> None:
    table.nft.apply(render.encode_commands([{"flush": {"set": allow_set_ref(table)}}]))


def make_elements(first: int, count: int, *, ttl: int, request: int) -> list[Element]:
    """``count`` entries as the engine would write them: policy-checked addresses, varied
    timeouts, comments naming a realistic subject and a UUID request id."""
    policy = parse_config(CONFIG).address_policy
    out = []
    for i in range(first, first + count):
        address = normalize_address(str(FIRST_ADDRESS + i), policy)
        subject = f"agent-{i:06d}@dialer-{i % 40:02d}.example.com"
        request_id = str(uuid.UUID(int=(request << 64) | i))
        out.append(
            Element(
                EntryKey(PROFILE, address),
                timeout_s=ttl + i % 600,
                comment=render.element_comment(subject, request_id),
            )
        )
    return out


def nft_text_elements(elements: Sequence[Element]) -> str:
    """The same elements in nft's own syntax (comments are ours and contain no quote)."""
    parts = []
    for e in elements:
        if '"' in e.comment:
            raise ValueError("bench comments must not need quoting")
        parts.append(f'{e.key.address.element} timeout {e.timeout_s}s comment "{e.comment}"')
    return ",\n".join(parts)


# --- measuring -------------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def nft_file(path: Path) -> None:
    subprocess.run(["nft", "-f", str(path)], check=True)


def paired(
    repeats: int, agent: Callable[[], object], raw: Callable[[], object], reset: Callable[[], None]
) -> tuple[list[float], list[float]]:
    """Time ``agent`` and ``raw`` ``repeats`` times each, alternating which runs first."""
    agent_s: list[float] = []
    raw_s: list[float] = []
    for r in range(repeats):
        order = ((agent, agent_s), (raw, raw_s))
        for fn, into in order if r % 2 == 0 else order[::-1]:
            reset()
            into.append(timed(fn))
    return agent_s, raw_s


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def rss_mb() -> float:
    return _status_kib("VmRSS") / 1024


def peak_rss_mb() -> float:
    return _status_kib("VmHWM") / 1024


def reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0), so a peak can be
    # attributed to one step of a process rather than to its whole life.
    Path("/proc/self/clear_refs").write_text("5")


# --- scenarios -------------------------------------------------------------------------------


def scenario_memory() -> dict[str, Any]:
    table = make_table()
    elements = make_elements(0, BULK, ttl=3600, request=1)
    baseline = rss_mb()
    reset_peak_rss()
    table.apply(elements, present=set())
    add_peak = peak_rss_mb()
    after_add = rss_mb()
    reset_peak_rss()
    before_read = rss_mb()
    count = len(table.read_elements([(PROFILE, 4)]))
    read_peak = peak_rss_mb()
    return {
        "baseline_rss_mb": baseline,
        "add_peak_rss_mb": add_peak,
        "after_add_rss_mb": after_add,
        "before_read_rss_mb": before_read,
        "read_peak_rss_mb": read_peak,
        "after_read_rss_mb": rss_mb(),
        "read_count": count,
    }


def scenario_speed() -> dict[str, Any]:
    table = make_table()
    bulk = make_elements(0, BULK, ttl=3600, request=1)
    refreshed = make_elements(0, REFRESH, ttl=7200, request=2)
    singles = make_elements(BULK, SINGLE_ADDS, ttl=3600, request=3)
    set_name = f"inet {table.cfg.table} {render.allow_set(PROFILE, 4)}"
    with tempfile.TemporaryDirectory(prefix="vf-bench-") as tmp:
        add_file = Path(tmp, "add.nft")
        add_file.write_text(f"add element {set_name} {{\n{nft_text_elements(bulk)}\n}}\n")
        refresh_file = Path(tmp, "refresh.nft")
        addresses = ", ".join(e.key.address.element for e in refreshed)
        refresh_file.write_text(
            f"delete element {set_name} {{ {addresses} }}\n"
            f"add element {set_name} {{\n{nft_text_elements(refreshed)}\n}}\n"
        )

        add_agent, add_raw = paired(
            BULK_REPEATS,
            lambda: table.apply(bulk, present=set()),
            lambda: nft_file(add_file),
            lambda: flush_allow_set(table),
        )
        # The set now holds the 100,000 bulk entries; a refresh leaves it holding them.
        present = {e.key for e in refreshed}
        refresh_agent, refresh_raw = paired(
            REFRESH_REPEATS,
            lambda: table.apply(refreshed, present=present),
            lambda: nft_file(refresh_file),
            lambda: None,
        )

    counts: list[int] = []
    listing = ["nft", "-j", "list", "set", *set_name.split()]
    read_agent, read_raw = paired(
        READBACK_REPEATS,
        lambda: counts.append(len(table.read_elements([(PROFILE, 4)]))),
        lambda: subprocess.run(listing, check=True, capture_output=True),
        lambda: None,
    )
    add1 = [timed(partial(table.apply, [e], present=set())) for e in singles]
    return {
        "add_agent_s": add_agent,
        "add_raw_s": add_raw,
        "refresh_agent_s": refresh_agent,
        "refresh_raw_s": refresh_raw,
        "readback_agent_s": read_agent,
        "readback_raw_s": read_raw,
        "readback_counts": counts,
        "add1_agent_s": add1,
        "bulk": BULK,
        "refresh": REFRESH,
    }


SCENARIOS: dict[str, Callable[[], dict[str, Any]]] = {
    "memory": scenario_memory,
    "speed": scenario_speed,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernel_worker")
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    args = parser.parse_args(argv)
    print(json.dumps(SCENARIOS[args.scenario]()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
