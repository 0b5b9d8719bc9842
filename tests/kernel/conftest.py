"""Kernel-test fixtures: the agent's table installed in a fresh lab (see tests/conftest.py)."""

from __future__ import annotations

import pytest
from netlab import Lab
from tablekit import Rig, open_rig


@pytest.fixture
def rig(lab: Lab) -> Rig:
    """The agent's table (default ``agent`` profile) installed and probed in ``lab``'s server."""
    return open_rig(lab)
