"""The boot id under the shipped unit: ``ProcSubset=pid`` hides /proc/sys from the daemon, so the
unit hands it systemd's ``%b`` and the fast start after a clean stop keeps working (issue 20).
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from agent.rules import monitor
from agent.rules.monitor import BOOT_ID_ENV, boot_id

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "vicifast-agent.service"
DASHED = "3b1f4c2e-9d8a-4f7b-8c6d-5e4f3a2b1c0d"
PLAIN = DASHED.replace("-", "")


def unit_service_section() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    # A unit repeats keys (SystemCallFilter=): keep every value, in order.
    section = ""
    for line in UNIT.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            section = stripped[1:-1]
        elif section == "Service" and "=" in stripped and not stripped.startswith("#"):
            key, value = stripped.split("=", 1)
            values.setdefault(key, []).append(value)
    return values


def test_the_unit_hides_proc_sys_and_hands_the_daemon_the_boot_id() -> None:
    service = unit_service_section()
    assert service["ProcSubset"] == ["pid"]  # what makes the boot id file unreadable
    assert f"{BOOT_ID_ENV}=%b" in service.get("Environment", [])


def test_without_proc_sys_the_boot_id_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(monitor, "_BOOT_ID_FILE", str(tmp_path / "absent"))
    monkeypatch.setenv(BOOT_ID_ENV, PLAIN.upper())  # %b: 32 hex digits, no dashes
    assert boot_id() == PLAIN
    monkeypatch.delenv(BOOT_ID_ENV)
    with pytest.raises(FileNotFoundError):
        boot_id()


def test_the_file_and_the_unit_give_the_same_boot_id(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A daemon started by hand and one started by the unit must agree, or every switch
    between the two would cost a full listing."""
    file = tmp_path / "boot_id"
    file.write_text(DASHED + "\n")
    monkeypatch.setattr(monitor, "_BOOT_ID_FILE", str(file))
    monkeypatch.delenv(BOOT_ID_ENV, raising=False)
    from_file = boot_id()
    monkeypatch.setenv(BOOT_ID_ENV, PLAIN)
    assert boot_id() == from_file == PLAIN


@pytest.mark.parametrize("bad", ["", "%b", "not-a-boot-id", PLAIN[:-1], PLAIN + "0", "g" * 32])
def test_a_malformed_boot_id_is_an_error_not_a_fingerprint(
    monkeypatch: pytest.MonkeyPatch, bad: str
) -> None:
    monkeypatch.setenv(BOOT_ID_ENV, bad)
    with pytest.raises(OSError, match=f"{BOOT_ID_ENV} holds no boot id") as raised:
        boot_id()
    assert raised.value.errno == errno.EINVAL
