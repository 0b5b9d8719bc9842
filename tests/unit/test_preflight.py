"""agent.preflight: TLS material that belongs together, the state lock, key files, their users."""

from __future__ import annotations

import os
import pwd
import tempfile
from pathlib import Path

import pytest

from agent.devpki import DevMaterial, make_dev_pki
from agent.errors import ConfigError
from agent.preflight import (
    ServiceUser,
    StateDirLocked,
    StateLock,
    key_file_problems,
    service_user,
    unreadable_as,
    verify_tls,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevMaterial:
    return make_dev_pki(tmp_path_factory.mktemp("pki"), "dev-agent")


def _material(pki: DevMaterial) -> tuple[bytes, bytes, bytes]:
    return pki.server.cert.read_bytes(), pki.server.key.read_bytes(), pki.ca_cert.read_bytes()


def test_matching_material_passes(pki: DevMaterial) -> None:
    verify_tls(*_material(pki))


@pytest.mark.parametrize(
    ("which", "damage", "key"),
    [
        (1, lambda b: b[:100], "api.server_key"),
        (1, lambda b: b"", "api.server_key"),
        (0, lambda b: b[:100], "api.server_cert"),
        (2, lambda b: b"-----BEGIN CERTIFICATE-----\nxx\n", "api.client_ca"),
    ],
)
def test_damaged_material_names_its_key(pki: DevMaterial, which: int, damage, key: str) -> None:  # type: ignore[no-untyped-def]
    parts = list(_material(pki))
    parts[which] = damage(parts[which])
    with pytest.raises(ConfigError) as caught:
        verify_tls(*parts)
    assert caught.value.key == key


def test_a_key_of_another_certificate_is_refused(pki: DevMaterial) -> None:
    other = pki.issue_server_cert("other")
    cert, _, ca = _material(pki)
    with pytest.raises(ConfigError, match="does not belong") as caught:
        verify_tls(cert, other.key.read_bytes(), ca)
    assert caught.value.key == "api.server_key"


def test_the_state_lock_is_exclusive_and_names_its_holder(tmp_path: Path) -> None:
    first = StateLock.take(tmp_path / "state")
    try:
        with pytest.raises(StateDirLocked, match=f"pid {os.getpid()}") as caught:
            StateLock.take(tmp_path / "state")
        assert caught.value.reason == "already_running"
    finally:
        first.release()
    StateLock.take(tmp_path / "state").release()  # free again once released


ME = ServiceUser("me", os.geteuid(), os.getegid())


def _key_file(tmp_path: Path, mode: int) -> Path:
    path = tmp_path / "server.key"
    path.write_bytes(b"k")
    os.chmod(path, mode)
    return path


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o640, 0o440])
def test_private_key_modes_that_are_accepted(tmp_path: Path, mode: int) -> None:
    assert key_file_problems("api.server_key", _key_file(tmp_path, mode), ME) == []


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o602, 0o660, 0o666, 0o620])
def test_private_key_modes_that_are_refused(tmp_path: Path, mode: int) -> None:
    problems = key_file_problems("api.server_key", _key_file(tmp_path, mode), ME)
    assert [p.key for p in problems] == ["api.server_key"]
    assert f"{mode:04o}" in problems[0].detail
    assert "chmod" in problems[0].detail


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file another owner needs root")
def test_a_private_key_owned_by_a_third_user_is_refused(tmp_path: Path) -> None:
    path = _key_file(tmp_path, 0o600)
    nobody = pwd.getpwnam("nobody")
    os.chown(path, nobody.pw_uid, nobody.pw_gid)
    daemon_user = ServiceUser("daemon", pwd.getpwnam("daemon").pw_uid, 1)
    problems = key_file_problems("api.server_key", path, daemon_user)
    assert any("owned by uid" in p.detail for p in problems)


@pytest.mark.skipif(os.geteuid() != 0, reason="checking as another user needs root")
def test_root_checks_readability_as_the_service_user() -> None:
    # Not under pytest's tmp_path: its parents are root's 0700, which nobody may traverse.
    with tempfile.TemporaryDirectory(dir="/tmp") as where:
        _check_as_nobody(Path(where))


def _check_as_nobody(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)  # noqa: S103  # the service user must reach the files
    readable = _key_file(tmp_path, 0o644)
    private = tmp_path / "private.key"
    private.write_bytes(b"k")
    os.chmod(private, 0o600)  # root's: root reads it, the service user does not
    nobody = pwd.getpwnam("nobody")
    user = ServiceUser("nobody", nobody.pw_uid, nobody.pw_gid)
    found = unreadable_as(user, [readable, private, tmp_path / "missing.key"])
    assert set(found) == {private, tmp_path / "missing.key"}
    assert "ermission" in found[private]


def test_an_unknown_requested_user_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        service_user("no-such-user-vf")
    assert caught.value.key == "--user"


def test_the_default_user_is_the_units_or_the_caller() -> None:
    user = service_user()
    if os.geteuid() != 0:
        assert user.uid == os.geteuid()
        return
    try:
        expected = pwd.getpwnam("vicifast-agent").pw_uid
    except KeyError:
        assert (user.uid, user.name) == (0, "root")
        assert "no user vicifast-agent" in user.note
    else:
        assert user.uid == expected
