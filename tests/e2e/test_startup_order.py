"""A start that fails touches nothing: the checks and the state directory's lock come first.

Real daemon processes (``agent.devlab.DevAgent``) in namespaces of their own; the namespace's
ruleset is read with ``nft`` before and after.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from netlab import Netns

from agent.devlab import DevAgent, scratch_netns

EXIT_TIMEOUT_S = 30.0
# Somebody else's table in the namespace: a failed start must leave it exactly as it was too.
FOREIGN = (
    "table inet someone_else {\n\tchain input {\n\t\ttype filter hook input priority 0;\n\t}\n}"
)


@pytest.fixture
def netns() -> Iterator[Netns]:
    with scratch_netns("vf-start") as name:
        ns = Netns(name)
        ns.nft_script(FOREIGN)
        yield ns


def _truncate(agent: DevAgent) -> None:
    key = agent.pki.server.key
    key.write_bytes(key.read_bytes()[:100])


def _other_key(agent: DevAgent) -> None:
    other = agent.pki.issue_server_cert("other")
    os.replace(other.key, agent.pki.server.key)


def _missing(agent: DevAgent) -> None:
    agent.pki.server.key.unlink()


def _bad_ca(agent: DevAgent) -> None:
    agent.pki.ca_cert.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")


def _bad_trusted_key(agent: DevAgent) -> None:
    agent.write_config(agent.config_text(trusted_keys={"ed25519:0000000000000000": "AAAA"}))


BREAKAGES: dict[str, Callable[[DevAgent], None]] = {
    "truncated_server_key": _truncate,
    "server_key_of_another_certificate": _other_key,
    "missing_server_key": _missing,
    "client_ca_not_pem": _bad_ca,
    "trusted_key_not_ed25519": _bad_trusted_key,
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_a_start_that_fails_on_its_material_leaves_the_ruleset_as_it_was(
    breakage: str, netns: Netns, tmp_path: Path
) -> None:
    before = netns.ruleset()
    with DevAgent(tmp_path / "agent", netns.name) as dev:
        BREAKAGES[breakage](dev)
        dev.start(wait_ready=False)
        assert dev.process is not None
        code = dev.process.wait(timeout=EXIT_TIMEOUT_S)
        log = dev.log_path.read_text()
    assert code != 0, log
    assert "cannot start" in log, log
    assert "Traceback" not in log, log
    assert netns.ruleset() == before
    assert "vicifast" not in netns.ruleset()


def test_a_second_daemon_on_the_same_state_directory_exits_having_touched_nothing(
    tmp_path: Path,
) -> None:
    with (
        scratch_netns("vf-one") as one,
        scratch_netns("vf-two") as two,
        DevAgent(tmp_path / "agent", one) as first,
    ):
        first.start()
        second_ns = Netns(two)
        before = second_ns.ruleset()
        argv = first.argv()
        argv[argv.index(one)] = two  # same config, same state directory, another namespace
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "INVOCATION_ID")}
        env.pop("JOURNAL_STREAM", None)
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
        second = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=EXIT_TIMEOUT_S, check=False
        )
        assert second.returncode != 0, second.stderr
        assert "already uses the state directory" in second.stderr
        assert f"pid {first.pid}" in second.stderr or "another process" in second.stderr
        assert "Traceback" not in second.stderr
        assert second_ns.ruleset() == before == ""
        # The first one is unharmed and still serves.
        assert first.process is not None
        assert first.process.poll() is None
        first.stop()
        # Once it stopped, the lock is free again: the same configuration starts.
        first.start()


@pytest.mark.parametrize("which", ["api", "metrics"])
def test_a_port_held_by_another_program_fails_the_start_before_the_kernel(
    which: str, netns: Netns, tmp_path: Path
) -> None:
    before = netns.ruleset()
    with DevAgent(tmp_path / "agent", netns.name) as dev:
        listen = dev.api_listen if which == "api" else dev.metrics_listen
        host, _, port = listen.rpartition(":")
        holder = netns.call(socket.create_server, (host, int(port)))
        try:
            dev.start(wait_ready=False)
            assert dev.process is not None
            code = dev.process.wait(timeout=EXIT_TIMEOUT_S)
        finally:
            holder.close()
        log = dev.log_path.read_text()
    assert code != 0, log
    assert netns.ruleset() == before
    assert f"{which}.listen: {listen} is already in use" in log
