"""``doctor``'s checks and verdict: plain words, and an exit code that says whether all is well."""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
from pathlib import Path

import pytest
from cryptography import x509

from agent.config import ApiConfig
from agent.devpki import make_dev_pki
from agent.doctor import (
    Check,
    Level,
    check_certificates,
    check_clock,
    check_config_file,
    check_shadowing,
    check_state_dir,
    check_table,
    exit_code,
    offline_checks,
    render,
)
from agent.rules.shadowing import Shadow

NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("levels", "code"),
    [
        ([], 0),
        ([Level.OK, Level.INFO], 0),
        ([Level.OK, Level.WARNING, Level.INFO], 1),
        ([Level.WARNING, Level.PROBLEM], 5),  # 2 is a usage error (agent.cli_contract)
        ([Level.PROBLEM], 5),
    ],
)
def test_exit_code_is_the_worst_level(levels: list[Level], code: int) -> None:
    checks = [Check(f"c{i}", lv, "x") for i, lv in enumerate(levels)]
    assert exit_code(checks) == code
    assert render(checks).splitlines()[-1].startswith("doctor: ")


def test_checks_survive_the_json_round_trip() -> None:
    c = Check("clock", Level.WARNING, "went backwards", "check NTP")
    assert Check.from_json(c.to_json()) == c


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return make_dev_pki(tmp_path_factory.mktemp("pki"), "a1", validity_days=30, now=NOW)


def _api(pki, key: Path | None = None) -> ApiConfig:  # type: ignore[no-untyped-def]
    return ApiConfig(
        server_cert=pki.server.cert, server_key=key or pki.server.key, client_ca=pki.ca_cert
    )


def _not_after(path: Path) -> dt.datetime:
    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc


@pytest.mark.parametrize(
    ("when", "level"),
    [
        (lambda after: NOW + dt.timedelta(days=1), Level.OK),
        (lambda after: after - dt.timedelta(days=13), Level.WARNING),
        (lambda after: after + dt.timedelta(seconds=1), Level.PROBLEM),
        (lambda after: NOW - dt.timedelta(days=400), Level.PROBLEM),
    ],
    ids=["valid", "expires-within-14-days", "expired", "not-yet-valid"],
)
def test_certificate_validity(pki, when, level: Level) -> None:  # type: ignore[no-untyped-def]
    checks = check_certificates(_api(pki), when(_not_after(pki.server.cert)))
    server = next(c for c in checks if c.name == "server certificate")
    assert server.level is level, server.summary


def test_a_server_key_of_another_certificate_is_a_problem(pki) -> None:  # type: ignore[no-untyped-def]
    checks = check_certificates(_api(pki, key=pki.client.key), NOW + dt.timedelta(days=1))
    key = next(c for c in checks if c.name == "server key")
    assert key.level is Level.PROBLEM


def test_an_unreadable_certificate_is_a_problem(tmp_path: Path, pki) -> None:  # type: ignore[no-untyped-def]
    api = ApiConfig(
        server_cert=tmp_path / "nope.crt", server_key=pki.server.key, client_ca=pki.ca_cert
    )
    checks = check_certificates(api, NOW)
    assert [c.level for c in checks if c.name == "server certificate"] == [Level.PROBLEM]


@pytest.mark.parametrize(
    ("now", "mtimes", "synced", "level"),
    [
        (NOW.timestamp(), {}, True, Level.OK),
        (NOW.timestamp(), {}, None, Level.OK),
        (NOW.timestamp(), {}, False, Level.INFO),
        (dt.datetime(2001, 1, 1, tzinfo=dt.UTC).timestamp(), {}, True, Level.PROBLEM),
        (NOW.timestamp(), {"state.db": NOW.timestamp() + 3600}, True, Level.WARNING),
        (NOW.timestamp(), {"state.db": NOW.timestamp() + 10}, True, Level.OK),
    ],
)
def test_clock_sanity(
    now: float, mtimes: dict[str, float], synced: bool | None, level: Level
) -> None:
    assert check_clock(now, reference_mtimes=mtimes, synchronized=synced).level is level


def _levels(checks: list[Check]) -> dict[str, Level]:
    return {c.name: c.level for c in checks}


def test_a_private_writable_state_directory_with_a_sound_database_is_ok(tmp_path: Path) -> None:
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    sqlite3.connect(d / "state.db").execute("create table t (x)").connection.close()
    levels = _levels(check_state_dir(d))
    assert levels["state directory"] is Level.OK
    assert levels["state database"] is Level.OK


def test_state_directory_problems_are_named(tmp_path: Path) -> None:
    d = tmp_path / "state"
    d.mkdir()
    d.chmod(0o755)
    (d / "state.db").write_bytes(b"this is not a database" * 100)
    levels = _levels(check_state_dir(d))
    assert levels["state directory"] is Level.WARNING
    assert levels["state database"] is Level.PROBLEM
    assert _levels(check_state_dir(tmp_path / "absent"))["state directory"] is Level.WARNING
    (tmp_path / "file").write_text("")
    assert _levels(check_state_dir(tmp_path / "file"))["state directory"] is Level.PROBLEM


def test_a_config_that_does_not_parse_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('agent_id = "a1"\n[local]\nttl_cap_s = "long"\n')
    check, cfg = check_config_file(path)
    assert cfg is None
    assert check.level is Level.PROBLEM
    assert "local.ttl_cap_s" in check.summary


def test_offline_checks_cover_config_state_certificates_and_clock(tmp_path: Path, pki) -> None:  # type: ignore[no-untyped-def]
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    path = tmp_path / "agent.toml"
    path.write_text(
        f'agent_id = "a1"\n[state]\ndirectory = "{state}"\n[api]\n'
        f'server_cert = "{pki.server.cert}"\nserver_key = "{pki.server.key}"\n'
        f'client_ca = "{pki.ca_cert}"\n'
    )
    names = {c.name for c in offline_checks(path, NOW.timestamp() + 86400)}
    assert {"config", "state directory", "server certificate", "client CA", "clock"} <= names


@pytest.mark.parametrize(
    ("present", "missing", "level"),
    [(True, [], Level.OK), (True, ["chain prof_agent"], Level.PROBLEM), (False, [], Level.PROBLEM)],
)
def test_table_integrity(present: bool, missing: list[str], level: Level) -> None:
    assert check_table("vicifast", present, missing).level is level


def test_every_shadowing_chain_is_a_problem_with_advice() -> None:
    assert [c.level for c in check_shadowing([])] == [Level.OK]
    shadow = Shadow("ip", "filter", "input", 0, ("5060/udp",), "policy drop")
    (check,) = check_shadowing([shadow])
    assert check.level is Level.PROBLEM
    assert "ip filter chain input" in check.summary
    assert check.advice


def test_checks_only_read(tmp_path: Path) -> None:
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    before = sorted(os.listdir(d))
    check_state_dir(d)
    assert sorted(os.listdir(d)) == before
