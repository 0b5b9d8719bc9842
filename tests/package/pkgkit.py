"""What the package test's fixtures hand to its steps (kept out of conftest.py so tests can import
it: every conftest module is named ``conftest``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from netlab import Lab
from nspawn import Container

from agent.devpki import DevMaterial

AGENT_ID = "pkgtest.example.com"


@dataclass(frozen=True, slots=True)
class Debs:
    """The package under test and a newer build of the same tree (the upgrade)."""

    current: Path
    newer: Path


@dataclass(frozen=True, slots=True)
class System:
    """A booted container of Debian ``release`` (a codename) with nothing of ours installed yet,
    its lab, a dev PKI, and the packages built for that release."""

    container: Container
    lab: Lab
    pki: DevMaterial
    debs: Debs
    release: str


def upstream_version(deb: Path) -> str:
    """The agent's own version in a package: the package's version less the release suffix
    (``0.1.0+pkgtest1~deb13u1`` holds agent 0.1.0+pkgtest1)."""
    return deb.name.split("_")[1].split("~deb")[0]
