"""The packaging's static promises (issue 20): one package per Debian release, the Python version
computed per release, and `make deb` able to start from a fresh root. The booted proof of each
package is `make test-package` (tests/package/)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def makefile_list(name: str) -> list[str]:
    found = re.search(rf"^{name}\s*:=(.*)$", (REPO / "Makefile").read_text(), re.M)
    assert found, name
    return found.group(1).split()


def releases() -> dict[str, tuple[str, str]]:
    rows = (REPO / "packaging" / "releases").read_text().splitlines()
    return {f[0]: (f[1], f[2]) for line in rows if (f := line.split()) and f[0][0] != "#"}


def test_each_supported_release_has_its_own_version_suffix() -> None:
    assert releases() == {"bookworm": ("12", "~deb12u1"), "trixie": ("13", "~deb13u1")}

    def older(a: str, b: str) -> bool:
        compared = subprocess.run(["dpkg", "--compare-versions", a, "lt", b], check=False)
        return compared.returncode == 0

    # The later release's build is the newer version: a server moved from 12 to 13 upgrades;
    # and the package test's "newer build" is newer on each release.
    assert older("0.1.0~deb12u1", "0.1.0~deb13u1")
    assert older("0.1.0~deb13u1", "0.1.0+pkgtest1~deb13u1")
    assert older("0.1.0+pkgtest1~deb12u1", "0.1.1~deb12u1")


def test_the_python_dependency_is_computed_per_release_not_fixed() -> None:
    control = (REPO / "debian" / "control").read_text()
    package = control.split("\nPackage:", 1)[1]
    assert "${vicifast:Python}" in package
    assert not re.search(r"python3 \((<<|>=) 3\.\d+\)", package)
    assert "-Vvicifast:Python=" in (REPO / "debian" / "rules").read_text()


def test_make_deb_installs_build_essential_which_dpkg_buildpackage_checks_first() -> None:
    """A fresh root has no build-essential; dpkg-checkbuilddeps stops without it."""
    assert "build-essential" in makefile_list("PACKAGE_APT_PKGS")
    build_root = (REPO / "packaging" / "build-in-root.sh").read_text()
    assert re.search(r"^packages=.*\bbuild-essential\b", build_root, re.M)
