"""``check-config`` refuses what cannot serve; ``doctor`` without root says so; ``status`` shows
the trusted keys and the clock. The real CLI handlers, real files, real users (as root)."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.admin import format_status
from agent.cli import build_parser
from agent.devpki import DevMaterial, make_dev_pki
from agent.doctor import Level, check_state_dir, offline_checks
from agent.preflight import ServiceUser

ROOT = Path(__file__).resolve().parents[2]
NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="other users' files need root")


@pytest.fixture
def where() -> Iterator[Path]:
    """A directory every user may traverse (pytest's tmp_path is root's 0700 on the way)."""
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="vf-check-") as d:
        os.chmod(d, 0o755)  # noqa: S103  # the service user must reach the files
        yield Path(d)


@pytest.fixture
def pki(where: Path) -> DevMaterial:
    material = make_dev_pki(where / "pki", "dialer-07")
    os.chmod(material.directory, 0o755)  # noqa: S103
    return material


def config(
    where: Path, pki: DevMaterial, *, agent_id: str = "dialer-07", keys: bool = True
) -> Path:
    text = f'agent_id = "{agent_id}"\n' + pki.config_toml(trusted_keys=None if keys else {})
    path = where / "agent.toml"
    path.write_text(text)
    os.chmod(path, 0o644)
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    args = build_parser().parse_args(list(argv))
    code = int(args.handler(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_a_config_ready_to_serve_passes(
    where: Path, pki: DevMaterial, capsys: pytest.CaptureFixture[str]
) -> None:
    me = pwd.getpwuid(os.geteuid()).pw_name
    code, out, err = run(capsys, "check-config", str(config(where, pki)), "--user", me)
    assert code == 0, err
    assert "OK" in out


def test_the_placeholder_agent_id_and_no_trusted_key_are_refused_by_name(
    where: Path, pki: DevMaterial, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config(where, pki, agent_id="dialer-01.example.com", keys=False)
    code, out, _ = run(capsys, "check-config", str(path), "--json")
    assert code == 1
    answer = json.loads(out)
    assert answer["ok"] is False
    assert [p["key"] for p in answer["problems"]][:2] == ["agent_id", "signing.trusted_keys"]
    assert "[signing.trusted_keys]" in answer["problems"][1]["error"]


def test_the_shipped_example_is_valid_but_not_ready(capsys: pytest.CaptureFixture[str]) -> None:
    example = str(ROOT / "packaging" / "agent.toml")
    assert run(capsys, "check-config", "--syntax-only", example)[0] == 0
    code, _, err = run(capsys, "check-config", example)
    assert code == 1
    assert "INVALID: agent_id:" in err
    assert "INVALID: signing.trusted_keys:" in err


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o660, 0o620])
def test_a_private_key_others_may_read_or_write_is_refused(
    where: Path, pki: DevMaterial, capsys: pytest.CaptureFixture[str], mode: int
) -> None:
    os.chmod(pki.server.key, mode)
    me = pwd.getpwuid(os.geteuid()).pw_name
    code, _, err = run(capsys, "check-config", str(config(where, pki)), "--user", me)
    assert code == 1
    assert "INVALID: api.server_key:" in err
    assert f"mode {mode:04o}" in err


@NEEDS_ROOT
def test_root_checks_that_the_service_user_can_read_the_key(
    where: Path, pki: DevMaterial, capsys: pytest.CaptureFixture[str]
) -> None:
    for path in (pki.server.cert, pki.ca_cert):
        os.chmod(path, 0o644)
    os.chmod(pki.server.key, 0o600)  # root's own: the daemon, running as nobody, cannot read it
    code, _, err = run(capsys, "check-config", str(config(where, pki)), "--user", "nobody")
    assert code == 1
    assert "INVALID: api.server_key:" in err
    assert "for user nobody" in err
    nobody = pwd.getpwnam("nobody")
    os.chown(pki.server.key, nobody.pw_uid, nobody.pw_gid)  # now it is the daemon user's
    code, _, err = run(capsys, "check-config", str(config(where, pki)), "--user", "nobody")
    assert code == 0, err


def test_doctor_flags_a_private_key_others_may_read(where: Path, pki: DevMaterial) -> None:
    os.chmod(pki.server.key, 0o644)
    checks = offline_checks(config(where, pki), time.time())
    flagged = [c for c in checks if c.name == "readiness" and c.level is Level.PROBLEM]
    assert [c.summary.split(":")[0] for c in flagged] == ["api.server_key"]
    assert "mode 0644" in flagged[0].summary
    os.chmod(pki.server.key, 0o640)
    assert [
        c.level for c in offline_checks(config(where, pki), time.time()) if c.name == "readiness"
    ] == [Level.OK]


@NEEDS_ROOT
def test_doctor_without_root_says_so_and_exits_without_a_traceback(
    where: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = where / "state"
    state.mkdir(mode=0o700)
    (state / "state.db").write_bytes(b"")
    path = where / "agent.toml"
    path.write_text(f'agent_id = "dialer-07"\n[state]\ndirectory = "{state}"\n')
    os.chmod(path, 0o644)
    argv = ["doctor", "--config", str(path), "--socket", str(where / "none.sock"), "--json"]
    os.seteuid(pwd.getpwnam("nobody").pw_uid)
    try:
        code, out, _ = run(capsys, *argv)
    finally:
        os.seteuid(0)
    answer = json.loads(out)
    checks = {c["name"]: c for c in answer["checks"]}
    assert "not root" in checks["privileges"]["summary"]
    assert "sudo vicifast-agent doctor" in checks["privileges"]["advice"]
    assert checks["state database"]["summary"].startswith("not checked")
    assert code == answer["exit_code"] == 5  # the daemon is not reachable: a problem


def test_the_state_directory_should_belong_to_the_daemons_user_not_root(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    unit_user = ServiceUser("vicifast-agent", os.geteuid() + 4242, 4242)
    (check, *_) = check_state_dir(state, owner=unit_user)
    assert check.level is Level.WARNING
    assert "owned by vicifast-agent" in check.summary
    assert f"chown vicifast-agent: {state}" in check.advice
    assert "expected 0700, uid 0" not in check.summary  # the advice that broke the daemon
    me = ServiceUser("me", os.geteuid(), os.getegid())
    assert check_state_dir(state, owner=me)[0].level is Level.OK
    assert stat.S_IMODE(state.stat().st_mode) == 0o700


def test_status_shows_trusted_keys_and_the_clock() -> None:
    status = {
        "agent_id": "a1",
        "version": "0.1.0",
        "pid": 1,
        "started_at_ms": 0,
        "now_ms": 1_800_000_000_000,
        "state_version": 1,
        "entries": 0,
        "local_entries": 0,
        "entries_by_profile": {},
        "in_sync": True,
        "last_verified_at_ms": 0,
        "drift_repairs": 0,
        "shadowing": [],
        "table": "inet vicifast",
        "listen": {"api": "[::]:7443", "metrics": "127.0.0.1:9617", "local": "/run/x.sock"},
        "trusted_keys": ["ed25519:0123456789abcdef", "ed25519:fedcba9876543210"],
        "clock": {
            "now_ms": 1_800_000_000_000,
            "ntp_synchronized": False,
            "clock_skew_s": 30,
            "max_window_s": 300,
        },
    }
    text = format_status(status)
    assert "ed25519:0123456789abcdef, ed25519:fedcba9876543210" in text
    assert "2027-01-15T08:00:00Z" in text
    assert "NOT NTP synchronized" in text
    assert "30 s of skew" in text
    with contextlib.suppress(KeyError):
        status["trusted_keys"] = []
    assert "NONE" in format_status(status)
