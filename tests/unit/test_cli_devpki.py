"""``vicifast-agent dev-pki``: what it writes, that it says DEV/TEST ONLY, and that it works."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.__main__ import main
from agent.config import parse_config
from agent.ctl.connection import resolve_connection
from agent.devpki import DEV_ONLY

FILES = {
    "ca_cert": "ca.crt",
    "ca_key": "ca.key",
    "server_cert": "server.crt",
    "server_key": "server.key",
    "client_cert": "client.crt",
    "client_key": "client.key",
    "signing_key": "signing.key",
    "config_snippet": "config-snippet.toml",
    "ctl_connection": "ctl.toml",
}


def test_json_names_every_file_written_and_warns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["dev-pki", str(tmp_path / "pki"), "--agent-id", "dialer-07", "--json"]) == 0
    out = capsys.readouterr()
    summary = json.loads(out.out)
    assert summary["dev_only"] is True
    assert DEV_ONLY in summary["warning"]
    assert DEV_ONLY in out.err
    assert summary["agent_id"] == "dialer-07"
    assert summary["keyid"].startswith("ed25519:")
    assert summary["files"] == {k: str(tmp_path / "pki" / v) for k, v in FILES.items()}
    for path in summary["files"].values():
        assert Path(path).is_file()


def test_human_output_is_loud_and_points_at_the_snippet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["dev-pki", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert DEV_ONLY in lines[0]
    assert DEV_ONLY in lines[-1]
    assert any(str(tmp_path / "config-snippet.toml") in line for line in lines)


def test_the_snippet_makes_a_valid_config_with_the_agent_id(tmp_path: Path) -> None:
    assert main(["dev-pki", str(tmp_path), "--agent-id", "dialer-07", "--json"]) == 0
    snippet = (tmp_path / "config-snippet.toml").read_text()
    config = parse_config('agent_id = "dialer-07"\n' + snippet)
    assert config.agent_id == "dialer-07"


def test_the_ctl_connection_file_is_complete_and_loads(tmp_path: Path) -> None:
    assert main(["dev-pki", str(tmp_path), "--target", "198.18.0.1:7443", "--json"]) == 0
    conn = resolve_connection({}, {}, connection_file=str(tmp_path / "ctl.toml"))
    assert (conn.target, conn.agent_id) == ("198.18.0.1:7443", "dev-agent")
    identity = conn.identity(signing=True)
    assert identity.client_cert == (tmp_path / "client.crt").read_bytes()
    assert identity.keyid.startswith("ed25519:")
