"""The package test's system: a booted container of the package's own Debian release in a lab
namespace, a dev PKI.

Collected only when ``VICIFAST_DEB`` names built packages (``make test-package`` sets it and
``VICIFAST_DEB_NEWER``: one package per release each, space-separated); ``make test`` leaves
this directory alone. Every test runs once per release (``[bookworm]``, ``[trixie]``), each in
a booted system of that release: which release a package is for is read from its version
suffix (``~deb13u1``, ``packaging/releases``). Like the kernel tests, a package test that
cannot run here is skipped on a developer machine and FAILS with ``CI=true``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from netlab import Lab
from nspawn import Container, cached_root, missing_tools, scratch_dir
from pkgkit import AGENT_ID, Debs, System

from agent.devpki import make_dev_pki

collect_ignore_glob = [] if os.environ.get("VICIFAST_DEB") else ["test_*.py"]

_ROOT_CONFTEST = Path(__file__).resolve().parent.parent / "conftest.py"
_RELEASES = Path(__file__).resolve().parents[2] / "packaging" / "releases"


def release_of(deb: Path) -> str:
    """The Debian codename a package is built for, from its version's suffix."""
    suffixes = {
        fields[2]: fields[0]
        for line in _RELEASES.read_text().splitlines()
        if (fields := line.split()) and not line.startswith("#")
    }
    found = re.fullmatch(r"vicifast-agent_[^_]*?(~deb\d+u\d+)_[^_]+\.deb", deb.name)
    if found is None or found.group(1) not in suffixes:
        raise pytest.UsageError(f"{deb}: no release suffix of {_RELEASES} in its name")
    return suffixes[found.group(1)]


def _packages() -> dict[str, Debs]:
    """The packages under test, by release: the current build and the newer one of each."""
    pairs: dict[str, list[Path]] = {}
    for name in ("VICIFAST_DEB", "VICIFAST_DEB_NEWER"):
        for deb in map(Path, os.environ.get(name, "").split()):
            pairs.setdefault(release_of(deb), []).append(deb)
    if any(len(debs) != 2 for debs in pairs.values()):
        raise pytest.UsageError(f"one VICIFAST_DEB and one VICIFAST_DEB_NEWER per release: {pairs}")
    return {release: Debs(*debs) for release, debs in pairs.items()}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "release" in metafunc.fixturenames:
        releases = sorted(_packages())
        metafunc.parametrize("release", releases, ids=releases, scope="module")


def _requirements(config: pytest.Config) -> None:
    """tests/conftest.py's rule: skip here, FAIL with CI=true (module-scoped, so by hand)."""
    root = next(
        p
        for p in config.pluginmanager.get_plugins()
        if getattr(p, "__file__", None) == str(_ROOT_CONFTEST)
    )
    reason = missing_tools() or root.missing_kernel()
    if reason is None:
        return
    if root.in_ci():
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def debs(release: str) -> Debs:
    found = _packages()[release]
    for p in (found.current, found.newer):
        if not p.is_file():
            pytest.fail(f"no package at {p!s}: run `make test-package`", pytrace=False)
    return found


@pytest.fixture(scope="module")
def system(
    release: str,
    debs: Debs,
    tmp_path_factory: pytest.TempPathFactory,
    pytestconfig: pytest.Config,
) -> Iterator[System]:
    """One container of ``release`` for the module's ordered steps (install, run, upgrade,
    remove, purge)."""
    _requirements(pytestconfig)
    root = cached_root(release)
    pki = make_dev_pki(tmp_path_factory.mktemp("pki"), AGENT_ID)
    with (
        Lab() as lab,
        scratch_dir("vicifast-pkgtest") as scratch,
        Container(root, lab.srv.name, scratch) as container,
    ):
        container.boot()
        yield System(container, lab, pki, debs, release)
