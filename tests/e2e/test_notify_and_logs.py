"""systemd's side channels never stop the daemon, and its first start is no drift.

Real daemon processes (``DevAgent``) in namespaces of their own: the notify socket is taken away
after READY=1; a fresh namespace is a first install.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from lifecycle_kit import poll_until

from agent.devlab import REPO_ROOT, DevAgent, scratch_netns


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[DevAgent]:
    with scratch_netns("vf-notify") as ns, DevAgent(tmp_path / "agent", ns) as agent:
        yield agent


def _status(dev: DevAgent) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "status", "--socket", str(dev.local_socket)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        timeout=30,
        check=False,
    )


def test_a_lost_notify_socket_after_ready_is_logged_once_and_ignored(dev: DevAgent) -> None:
    dev.start()
    assert dev.notify is not None
    dev.notify.close()  # removes the socket file: systemd went away
    dev.notify = None
    for _ in range(2):  # each reload sends RELOADING=1 and READY=1 to the lost socket
        dev.send_signal(signal.SIGHUP)
        seen = len(re.findall("reloaded configuration", dev.log_path.read_text()))
        poll_until(
            lambda n=seen: len(re.findall("reloaded configuration", dev.log_path.read_text())) > n,
            timeout=10,
        )
    assert dev.process is not None
    assert dev.process.poll() is None, dev.log_tail()
    log = dev.log_path.read_text()
    assert "Traceback" not in log
    assert log.count("cannot notify systemd") == 1
    assert "notify_failed" in log
    assert _status(dev).returncode == 0  # still serving
    assert dev.stop() == 0


def test_the_first_start_installs_the_table_and_logs_no_drift(dev: DevAgent) -> None:
    dev.start()
    log = dev.log_path.read_text()
    assert "table installed" in log
    assert "REASON='table_installed'" in log
    assert "REASON='drift'" not in log
    assert "structure restored" not in log


def test_in_a_terminal_the_daemon_logs_to_stderr_even_inside_a_service(dev: DevAgent) -> None:
    """A stale JOURNAL_STREAM/INVOCATION_ID (a shell inside a service) must not send the logs
    to the journal: stderr is not the journal stream."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "INVOCATION_ID": "0123456789abcdef0123456789abcdef",
        "JOURNAL_STREAM": "1:1",
    }
    env.pop("NOTIFY_SOCKET", None)
    dev.pki.server.key.write_bytes(b"")  # exits right after logging why
    done = subprocess.run(
        dev.argv(), env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode != 0
    assert "ERROR vicifast-agent: cannot start:" in done.stderr  # the stderr format
