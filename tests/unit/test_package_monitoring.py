"""The package ships the monitoring kit (monitoring/) under /usr/share/vicifast-agent/monitoring/,
as the README's "Metrics" section says: every file, by debian/vicifast-agent.install (dh_install).
The built package's file list is checked by tests/package (``make test-package``)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "debian" / "vicifast-agent.install"
SHARE = "usr/share/vicifast-agent/monitoring"


def installed() -> dict[str, str]:
    """Source file (relative to the tree) -> destination directory, as dh_install reads it."""
    out: dict[str, str] = {}
    for line in INSTALL.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        *sources, destination = line.split()
        for pattern in sources:
            for path in sorted(ROOT.glob(pattern)):
                out[str(path.relative_to(ROOT))] = destination.rstrip("/")
    return out


def test_every_monitoring_file_is_installed_under_usr_share() -> None:
    kit = {str(p.relative_to(ROOT)) for p in (ROOT / "monitoring").iterdir() if p.is_file()}
    shipped = {src: dst for src, dst in installed().items() if src.startswith("monitoring/")}

    assert {
        "monitoring/alerts.yml",
        "monitoring/alerts_test.yml",
        "monitoring/dashboard.json",
    } <= kit
    assert shipped == dict.fromkeys(kit, SHARE)


def test_the_readme_names_the_installed_kit() -> None:
    assert f"/{SHARE}/" in (ROOT / "README.md").read_text()
