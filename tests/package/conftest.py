"""The package test's system: a booted Debian 12 container in a lab namespace, a dev PKI.

Collected only when ``VICIFAST_DEB`` names a built package (``make test-package`` sets it and
``VICIFAST_DEB_NEWER``); ``make test`` leaves this directory alone. Like the kernel tests, a
package test that cannot run here is skipped on a developer machine and FAILS with ``CI=true``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from netlab import Lab
from nspawn import Container, cached_root, missing_tools, scratch_dir
from pkgkit import AGENT_ID, Debs, System

from agent.devpki import make_dev_pki

collect_ignore_glob = [] if os.environ.get("VICIFAST_DEB") else ["test_*.py"]

_ROOT_CONFTEST = Path(__file__).resolve().parent.parent / "conftest.py"


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
def debs() -> Debs:
    paths = [Path(os.environ.get(name, "")) for name in ("VICIFAST_DEB", "VICIFAST_DEB_NEWER")]
    for p in paths:
        if not p.is_file():
            pytest.fail(f"no package at {p!s}: run `make test-package`", pytrace=False)
    return Debs(*paths)


@pytest.fixture(scope="module")
def system(
    debs: Debs, tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[System]:
    """One container for the module's ordered steps (install, run, upgrade, remove, purge)."""
    _requirements(pytestconfig)
    root = cached_root()
    pki = make_dev_pki(tmp_path_factory.mktemp("pki"), AGENT_ID)
    with (
        Lab() as lab,
        scratch_dir("vicifast-pkgtest") as scratch,
        Container(root, lab.srv.name, scratch) as container,
    ):
        container.boot()
        yield System(container, lab, pki, debs)
