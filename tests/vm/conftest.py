"""The kernel tests on the releases' own kernels: one booted VM per release and package.

Collected only when ``VICIFAST_VM_DEBS`` names the packages to boot with, as
``RELEASE=PATH`` words (``make test-vm`` builds them and sets it); ``make test`` leaves this
directory alone. Like every kernel test, one that cannot run here is skipped on a developer
machine and FAILS with ``CI=true``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from vmkit import RELEASES, GuestRun, VmError, base_image, boot, missing_tools

from agent.ctl.connection import connection_file_text
from agent.devpki import make_dev_pki

collect_ignore_glob = [] if os.environ.get("VICIFAST_VM_DEBS") else ["test_*.py"]

AGENT_ID = "vm-dialer.example.com"
GUEST_SCRIPT = Path(__file__).resolve().parent / "guest.py"


def requested_debs() -> Mapping[str, Path]:
    """``VICIFAST_VM_DEBS`` as release -> package; an unknown release or a missing file fails."""
    debs: dict[str, Path] = {}
    for word in os.environ.get("VICIFAST_VM_DEBS", "").split():
        release, _, path = word.partition("=")
        if release not in RELEASES or not path:
            raise pytest.UsageError(f"VICIFAST_VM_DEBS: {word!r} is not RELEASE=PATH ({RELEASES})")
        debs[release] = Path(path)
    return debs


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "release" in metafunc.fixturenames:
        metafunc.parametrize("release", sorted(requested_debs()), scope="module")


def agent_toml() -> str:
    return f"""\
agent_id = "{AGENT_ID}"

[firewall]
permit_test_ranges = true

[api]
listen = "127.0.0.1:7443"
server_cert = "/etc/vicifast-agent/tls/server.crt"
server_key = "/etc/vicifast-agent/tls/server.key"
client_ca = "/etc/vicifast-agent/tls/client-ca.crt"
allowed_identities = ["spiffe://vicifast/control-plane"]
"""


def guest_files(deb: Path, pki_dir: Path) -> dict[str, Path | bytes]:
    """The data disk: the package, the checks, the agent's config and TLS, ``ctl``'s settings."""
    pki = make_dev_pki(pki_dir, AGENT_ID)
    config = agent_toml() + (
        f'\n[signing.trusted_keys]\n"{pki.signing.keyid}" = "{pki.signing.public_b64}"\n'
    )
    ctl = connection_file_text(
        {
            "target": "127.0.0.1:7443",
            "agent_id": AGENT_ID,
            "server_name": "localhost",
            "ca": "pki/ca.crt",
            "cert": "pki/client.crt",
            "key": "pki/client.key",
            "signing_key": "pki/signing.key",
            "keyid": pki.signing.keyid,
        },
        comment="DEV/TEST ONLY: the VM kernel test",
    )
    return {
        deb.name: deb,
        "guest.py": GUEST_SCRIPT,
        "agent.toml": config.encode(),
        "ctl.toml": ctl.encode(),
        "tls/server.crt": pki.server.cert,
        "tls/server.key": pki.server.key,
        "tls/client-ca.crt": pki.ca_cert,
        "pki/ca.crt": pki.ca_cert,
        "pki/client.crt": pki.client.cert,
        "pki/client.key": pki.client.key,
        "pki/signing.key": pki.signing.key,
    }


def _boot(release: str, deb: Path) -> GuestRun:
    scratch = Path(tempfile.mkdtemp(prefix=f"vicifast-vm-{release}-", dir="/var/tmp"))
    try:
        image = base_image(release)
        (scratch / "pki").mkdir()
        run = boot(image, guest_files(deb, scratch / "pki"), scratch)
        # Kept for reading after the run (what each kernel did: features, timings, journal).
        kept = Path("build/vm")
        kept.mkdir(parents=True, exist_ok=True)
        (kept / f"{release}-results.jsonl").write_text(
            "".join(json.dumps(c, sort_keys=True) + "\n" for c in run.checks.values())
        )
        (kept / f"{release}-console.log").write_text(run.console)
        if "done" not in run.checks:
            raise VmError(f"the {release} checks did not finish; console:\n{run.console_tail()}")
        return run
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture(scope="session")
def boots() -> Iterator[Mapping[str, Future[GuestRun]]]:
    """Every requested release booted at once: the VMs run side by side, not one after another."""
    reason = missing_tools()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(reason)
    debs = requested_debs()
    for deb in debs.values():
        if not deb.is_file():
            pytest.fail(f"no package at {deb}: run `make test-vm`", pytrace=False)
    with ThreadPoolExecutor(max_workers=len(debs), thread_name_prefix="vm") as pool:
        yield {release: pool.submit(_boot, release, deb) for release, deb in debs.items()}


@pytest.fixture(scope="module")
def guest(release: str, boots: Mapping[str, Future[GuestRun]]) -> GuestRun:
    """One boot of ``release`` on its own kernel with its package; every check's verdict."""
    return boots[release].result()
