"""A reload checks what it loads, and ``vicifast-agent reload`` reports the daemon's verdict.

A real daemon (``DevAgent``) in a namespace of its own; the CLI is the real ``python -m agent``
talking to the daemon's local socket; TLS handshakes are real, through a relay.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.devlab import REPO_ROOT, DevAgent, TcpRelay, scratch_netns
from agent.rpc.client import AgentCallError


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[DevAgent]:
    with scratch_netns("vf-reload") as ns, DevAgent(tmp_path / "agent", ns) as agent:
        agent.start()
        yield agent


@pytest.fixture
def relay(dev: DevAgent) -> Iterator[TcpRelay]:
    r = dev.relay()
    yield r
    r.close()


def cli(dev: DevAgent, command: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """``vicifast-agent COMMAND`` for ``dev``; its socket named, since its config may be broken
    (a later ``--socket`` in ``argv`` wins)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    socket_path = str(dev.local_socket)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            command,
            "--socket",
            socket_path,
            *argv,
            "--config",
            str(dev.config_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def _serves(dev: DevAgent, relay: TcpRelay) -> bool:
    """A fresh connection (a new TLS handshake with the material in use) gets an answer."""
    client = dev.client(relay.address)
    try:
        client.state()
    except AgentCallError:
        return False
    finally:
        client.close()
    return True


def test_reload_answers_with_the_daemons_verdict(dev: DevAgent, relay: TcpRelay) -> None:
    ok = cli(dev, "reload")
    assert ok.returncode == 0, ok.stderr
    assert "reloaded configuration" in ok.stdout

    dev.write_config(dev.config_text() + "\nno_such_key = 1\n")
    refused = cli(dev, "reload")
    assert refused.returncode == 3, refused.stderr
    assert "invalid_config" in refused.stderr
    assert "no_such_key" in refused.stderr  # the reason names the key
    assert "reload refused" in dev.log_tail()

    as_json = cli(dev, "reload", "--json")
    assert as_json.returncode == 3
    assert json.loads(as_json.stdout)["error"]["reason"] == "invalid_config"

    dev.write_config()
    assert cli(dev, "reload").returncode == 0
    assert _serves(dev, relay)


def test_reload_without_a_daemon_is_unreachable_or_falls_back_to_sighup(
    dev: DevAgent, tmp_path: Path
) -> None:
    missing = cli(dev, "reload", "--socket", str(tmp_path / "none.sock"))
    assert missing.returncode == 4
    assert dev.notify is not None
    dev.notify.drain()
    fallback = cli(dev, "reload", "--socket", str(tmp_path / "none.sock"), "--pid", str(dev.pid))
    assert fallback.returncode == 0
    assert "sent SIGHUP" in fallback.stderr
    dev.notify.wait_for("RELOADING", "1", timeout=10)
    dev.notify.wait_for("READY", "1", timeout=10)


def _truncate_key(dev: DevAgent) -> None:
    key = dev.pki.server.key
    key.write_bytes(key.read_bytes()[:100])


def _key_of_another_certificate(dev: DevAgent) -> None:
    other = dev.pki.issue_server_cert("other")
    os.replace(other.key, dev.pki.server.key)


def _ca_not_pem(dev: DevAgent) -> None:
    # Another file: the dev PKI's CA is also what the test's own client trusts.
    broken = dev.directory / "broken-ca.crt"
    broken.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
    dev.write_config(dev.config_text().replace(str(dev.pki.ca_cert), str(broken)))


@pytest.mark.parametrize(
    "damage", [_truncate_key, _key_of_another_certificate, _ca_not_pem], ids=lambda f: f.__name__
)
def test_sighup_with_damaged_tls_material_is_refused_and_the_old_credentials_stay(
    dev: DevAgent, relay: TcpRelay, damage: object
) -> None:
    assert callable(damage)
    damage(dev)
    assert dev.notify is not None
    dev.notify.drain()
    dev.send_signal(signal.SIGHUP)
    dev.notify.wait_for("RELOADING", "1", timeout=10)
    dev.notify.wait_for("READY", "1", timeout=10)
    log = dev.log_tail()
    assert "reload refused" in log
    assert "reloaded configuration" not in log
    assert _serves(dev, relay)  # new handshakes still get the old, working material
    refused = cli(dev, "reload")
    assert refused.returncode == 3
    assert "api." in refused.stderr


def test_status_shows_the_trusted_keys_and_the_clock(dev: DevAgent) -> None:
    shown = cli(dev, "status")
    assert shown.returncode == 0, shown.stderr
    assert dev.pki.signing.keyid in shown.stdout
    assert "clock:" in shown.stdout
    assert "30 s of skew" in shown.stdout
    status = json.loads(cli(dev, "status", "--json").stdout)
    assert status["trusted_keys"] == [dev.pki.signing.keyid]
    assert status["clock"]["clock_skew_s"] == 30
