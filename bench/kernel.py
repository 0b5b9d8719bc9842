"""Kernel-layer figures: the agent's rules layer against raw ``nft`` on the same machine.

Owns the judging of ``bench.kernel_worker``'s raw readings: medians, ratios, targets. It runs
the workers in one scratch namespace it creates and deletes, each scenario in a fresh process.
Timings are reported as ratios against ``nft`` doing the same work in the same run (a shared,
noisy machine moves both alike); each ratio is the median of back-to-back pairs.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from bench import Figure
from bench.netns import run_worker, scratch_netns

WORKER = "bench.kernel_worker"


def paired_ratio(agent: Sequence[float], raw: Sequence[float]) -> float:
    return statistics.median(a / r for a, r in zip(agent, raw, strict=True))


def _check_counts(speed: dict[str, Any]) -> None:
    # Only the speed worker's reads are checked: the memory worker reads right after a bulk add
    # into a brand-new set, when a kernel dump can repeat some elements and miss others while
    # the set's hash table settles (seen on 6.18: ~90% unique); its read is a memory figure.
    bulk = int(speed["bulk"])
    counts = speed["readback_counts"]
    if any(c != bulk for c in counts):
        raise RuntimeError(f"read back {counts} entries, expected {bulk} each time")


def figures(speed: dict[str, Any], memory: dict[str, Any]) -> list[Figure]:
    _check_counts(speed)
    med = statistics.median
    return [
        Figure(
            "kernel.add_100k_ratio",
            paired_ratio(speed["add_agent_s"], speed["add_raw_s"]),
            "x nft -f",
            1.5,
            "100k entries, timeouts+comments, one transaction",
        ),
        Figure("kernel.add_100k_s", med(speed["add_agent_s"]), "s"),
        Figure("kernel.add_100k_nft_s", med(speed["add_raw_s"]), "s", note="raw nft -f"),
        Figure(
            "kernel.refresh_10k_ratio",
            paired_ratio(speed["refresh_agent_s"], speed["refresh_raw_s"]),
            "x nft -f",
            1.5,
            "delete+create of 10k present entries, one transaction",
        ),
        Figure("kernel.refresh_10k_s", med(speed["refresh_agent_s"]), "s"),
        Figure("kernel.refresh_10k_nft_s", med(speed["refresh_raw_s"]), "s", note="raw nft -f"),
        Figure(
            "kernel.readback_100k_s",
            med(speed["readback_agent_s"]),
            "s",
            note="FirewallTable.read_elements of 100k",
        ),
        Figure(
            "kernel.readback_100k_ratio",
            paired_ratio(speed["readback_agent_s"], speed["readback_raw_s"]),
            "x nft -j list",
            2.0,
        ),
        Figure(
            "kernel.add_1_ms",
            med(speed["add1_agent_s"]) * 1000,
            "ms",
            2.0,
            f"median of {len(speed['add1_agent_s'])}, set holding 100k",
        ),
        Figure(
            "kernel.add_1_p99_ms",
            statistics.quantiles(speed["add1_agent_s"], n=100)[98] * 1000,
            "ms",
        ),
        Figure(
            "kernel.worker_baseline_rss_mb",
            memory["baseline_rss_mb"],
            "MB",
            note="worker holding 100k Element values, before the add",
        ),
        Figure(
            "kernel.add_100k_peak_rss_mb",
            memory["add_peak_rss_mb"],
            "MB",
            note="peak during the 100k add (VmHWM)",
        ),
        Figure(
            "kernel.add_100k_after_rss_mb",
            memory["after_add_rss_mb"],
            "MB",
            note="RSS once the add returned",
        ),
        Figure(
            "kernel.readback_100k_peak_rss_mb",
            memory["read_peak_rss_mb"],
            "MB",
            note=f"peak reading 100k back (from {memory['before_read_rss_mb']:.0f} MB)",
        ),
        Figure("kernel.readback_100k_after_rss_mb", memory["after_read_rss_mb"], "MB"),
    ]


def run() -> list[Figure]:
    with scratch_netns() as netns:
        memory = run_worker(netns, WORKER, "memory")
        speed = run_worker(netns, WORKER, "speed")
    return figures(speed, memory)
