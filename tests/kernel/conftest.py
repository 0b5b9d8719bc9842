"""Kernel-test plumbing: the ``kernel`` marker, the root+netns requirement and the ``lab`` fixture.

Every test under tests/kernel needs root and network namespaces. Without them a test is skipped
on a developer machine but FAILS when ``CI=true``, so CI can never go green by skipping the
kernel. Fixtures here never touch the host's own namespace.
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
from tablekit import Rig, open_rig

_HERE = Path(__file__).parent


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


@functools.cache
def _missing_kernel() -> str | None:
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
    # This hook sees the whole session's items, so mark only those that live under tests/kernel.
    for item in items:
        if item.path.is_relative_to(_HERE):
            item.add_marker(pytest.mark.kernel)


@pytest.fixture(autouse=True)
def _kernel_required() -> None:
    reason = _missing_kernel()
    if reason is None:
        return
    if _in_ci():
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def lab(_kernel_required: None) -> Iterator[Lab]:
    """Fresh server and client namespaces joined by a veth pair; removed after the test."""
    with Lab() as fresh:
        yield fresh


@pytest.fixture
def rig(lab: Lab) -> Rig:
    """The agent's table (default ``agent`` profile) installed and probed in ``lab``'s server."""
    return open_rig(lab)
