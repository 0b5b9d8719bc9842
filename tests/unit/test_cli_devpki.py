"""``vicifast-agent dev-pki``: what it writes, that it says DEV/TEST ONLY, and that it works."""

from __future__ import annotations

import grp
import ipaddress
import json
import os
import re
import stat
from pathlib import Path

import pytest
from cryptography import x509

from agent.__main__ import main
from agent.config import parse_config
from agent.ctl.connection import resolve_connection
from agent.devpki import DEV_ONLY

REPO = Path(__file__).resolve().parents[2]

FILES = {
    "ca_cert": "client-ca.crt",
    "ca_key": "client-ca.key",
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


# --- --listen, file names and modes as the README's install steps have them -----------------


def test_listen_goes_into_the_snippet_and_the_ctl_target(tmp_path: Path) -> None:
    assert main(["dev-pki", str(tmp_path), "--listen", "0.0.0.0:7443", "--json"]) == 0
    config = parse_config(
        'agent_id = "dev-agent"\n' + (tmp_path / "config-snippet.toml").read_text()
    )
    assert config.api.listen == "0.0.0.0:7443"
    conn = resolve_connection({}, {}, connection_file=str(tmp_path / "ctl.toml"))
    assert conn.target == "127.0.0.1:7443"


@pytest.mark.parametrize(
    ("listen", "target"),
    [
        ("[::]:7443", "[::1]:7443"),
        ("198.18.0.1:7000", "198.18.0.1:7000"),
        ("[::1]:7443", "[::1]:7443"),
    ],
)
def test_the_ctl_target_follows_listen(tmp_path: Path, listen: str, target: str) -> None:
    assert main(["dev-pki", str(tmp_path), "--listen", listen, "--json"]) == 0
    assert resolve_connection({}, {}, connection_file=str(tmp_path / "ctl.toml")).target == target


def test_an_ip_listen_address_is_in_the_server_certificate(tmp_path: Path) -> None:
    assert main(["dev-pki", str(tmp_path), "--listen", "198.18.0.1:7443", "--json"]) == 0
    cert = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    ips = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("198.18.0.1") in ips.get_values_for_type(x509.IPAddress)


@pytest.mark.parametrize("listen", ["7443", "nope", "0.0.0.0:0", "0.0.0.0:70000", "host port"])
def test_a_bad_listen_is_a_usage_error(
    tmp_path: Path, listen: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["dev-pki", str(tmp_path / "pki"), "--listen", listen, "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["error"]["reason"] == "usage"
    assert not (tmp_path / "pki").exists()


def test_files_are_named_as_the_install_steps_and_the_unit_expect(tmp_path: Path) -> None:
    assert main(["dev-pki", str(tmp_path), "--json"]) == 0
    unit = (REPO / "systemd" / "vicifast-agent.service").read_text()
    for waited in re.findall(r"ConditionPathExists=/etc/vicifast-agent/tls/(\S+)", unit):
        assert (tmp_path / waited).is_file(), waited
    readme = (REPO / "README.md").read_text()
    for name in ("server.crt", "server.key", "client-ca.crt"):
        assert f"`{name}`" in readme
        assert (tmp_path / name).is_file()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another group needs root")
def test_the_server_key_goes_to_the_service_group_readable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    group = grp.getgrgid(65534).gr_name  # nogroup: stands in for the package's vicifast-agent
    assert main(["dev-pki", str(tmp_path), "--group", group, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["server_key_group"] == group
    st = (tmp_path / "server.key").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o640, 65534)
    for private in ("client-ca.key", "client.key", "signing.key"):
        assert stat.S_IMODE((tmp_path / private).stat().st_mode) == 0o600


def test_a_missing_group_leaves_the_key_with_its_own_group(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["dev-pki", str(tmp_path), "--group", "no-such-group-x", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["server_key_group"] is None
    assert (tmp_path / "server.key").stat().st_gid == os.getegid()
