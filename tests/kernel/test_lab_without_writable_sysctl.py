"""The harness does not assume the lab machine: it works where ``/proc/sys`` is read-only, as in
a container (LXC, nspawn, docker), because it writes no sysctl.

Proven by building a lab and sending IPv4 and IPv6 probes across it from a process whose private
mount namespace has ``/proc/sys`` bind-mounted read-only over itself (nothing outside changes).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent(
    """
    import errno
    from netlab import Lab

    try:
        with open("/proc/sys/net/ipv6/conf/all/accept_dad", "w") as f:
            f.write("0")
    except OSError as exc:
        assert exc.errno == errno.EROFS, exc
    else:
        raise SystemExit("/proc/sys is writable: the test proves nothing")
    with Lab() as lab:
        for family in (4, 6):
            probe = lab.probe("udp", 5060, family=family)
            assert probe.arrived, family
            assert probe.source == lab.addr.client(family)
    print("lab ok")
    """
)


# In a private mount namespace: /proc/sys bound read-only over itself, then the command.
READ_ONLY = 'mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && exec "$@"'


def test_lab_builds_and_carries_both_families_with_proc_sys_read_only() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)])}
    unshare = ["unshare", "--mount", "--propagation", "private", "sh", "-c", READ_ONLY, "sh"]
    done = subprocess.run(
        [*unshare, sys.executable, "-c", SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "lab ok" in done.stdout
