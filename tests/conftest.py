"""Plumbing shared by every suite that needs the real kernel: root, namespaces, and the CI rule.

Tests under tests/kernel and tests/e2e need root and network namespaces. Without them a test is
skipped on a developer machine but FAILS when ``CI=true``, so CI can never go green by skipping
the kernel. Fixtures here never touch the host's own namespace.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from netlab import Lab

_HERE = Path(__file__).parent
_NEEDS_KERNEL = {_HERE / "kernel": pytest.mark.kernel, _HERE / "e2e": pytest.mark.e2e}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


@functools.cache
def missing_kernel() -> str | None:
    """Why kernel tests cannot run here, or None when they can (checked once per session)."""
    if os.geteuid() != 0:
        return "kernel tests need root"
    for tool in ("ip", "nft", "conntrack"):
        if shutil.which(tool) is None:
            return f"kernel tests need the {tool!r} command"
    try:
        import nftables  # noqa: F401, PLC0415
    except ImportError:
        return "kernel tests need python3-nftables"
    name = f"vf-check-{os.urandom(4).hex()}"
    added = subprocess.run(
        ["ip", "netns", "add", name], check=False, capture_output=True, text=True
    )
    if added.returncode != 0:
        return f"cannot create a network namespace: {added.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for root, marker in _NEEDS_KERNEL.items():
            if item.path.is_relative_to(root):
                item.add_marker(marker)


@pytest.fixture(autouse=True)
def _kernel_required(request: pytest.FixtureRequest) -> None:
    if not any(request.node.get_closest_marker(m.name) for m in _NEEDS_KERNEL.values()):
        return
    reason = missing_kernel()
    if reason is None:
        return
    if in_ci():
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def lab(_kernel_required: None) -> Iterator[Lab]:
    """Fresh server and client namespaces joined by a veth pair; removed after the test."""
    with Lab() as fresh:
        yield fresh


@pytest.fixture
def promtool() -> str:
    """promtool's path (Debian's ``prometheus``); without it skip, or fail when CI=true."""
    path = shutil.which("promtool")
    if path is None:
        if in_ci():
            pytest.fail("CI=true and promtool is missing (apt-get install prometheus)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return path
