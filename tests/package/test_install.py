"""The .deb on a real booted Debian of its own release: install, run under the shipped unit,
upgrade, remove, purge.

Every test runs once per release built (``[bookworm]``: Debian 12, ``[trixie]``: Debian 13; see
conftest.py). One container per release for the whole module; the tests are its ordered steps
(``make test-package`` runs them with ``-x``: a step builds on the ones before). Every check looks
from outside the daemon: systemd's view of the unit, the kernel's ruleset, real packets over the
lab's veth from the client namespace, signed calls by the project's client over mTLS.
"""

from __future__ import annotations

import re
import socket
import ssl
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from netlab import Lab
from nspawn import Container
from pkgkit import AGENT_ID, System, upstream_version

from agent.devlab import TcpRelay
from agent.devpki import DevMaterial
from agent.rpc.client import AgentClient, ClientIdentity, Entry

UNIT = "vicifast-agent.service"
TLS = "/etc/vicifast-agent/tls"
STATE = "/var/lib/vicifast-agent"
API = ("198.18.0.1", 7443)
CAP_NET_ADMIN = 1 << 12
# Entries beyond the lab's real client sources, so the upgrade has a table worth keeping.
EXTRA = [f"198.18.{n // 250 + 10}.{n % 250 + 1}" for n in range(300)]


def config_toml(pki: DevMaterial) -> str:
    keyid, key = pki.signing.keyid, pki.signing.public_b64
    return f"""\
agent_id = "{AGENT_ID}"

[firewall]
permit_test_ranges = true

[api]
listen = "{API[0]}:{API[1]}"
server_cert = "{TLS}/server.crt"
server_key = "{TLS}/server.key"
client_ca = "{TLS}/client-ca.crt"
allowed_identities = ["spiffe://vicifast/control-plane"]

[signing.trusted_keys]
"{keyid}" = "{key}"
"""


def install_server_cert(c: Container, cert: Path, key: Path) -> None:
    c.put(f"{TLS}/server.crt", cert.read_bytes(), mode=0o644, owner="root:vicifast-agent")
    c.put(f"{TLS}/server.key", key.read_bytes(), mode=0o640, owner="root:vicifast-agent")


def main_pid(c: Container) -> int:
    return int(c.unit_property(UNIT, "MainPID"))


def is_active(c: Container) -> str:
    return c.run("systemctl", "is-active", UNIT, check=False).stdout.strip()


def table_exists(c: Container) -> bool:
    return c.run("nft", "list", "table", "inet", "vicifast", check=False).returncode == 0


def reaches(lab: Lab, src: str = "198.18.0.2") -> bool:
    return lab.reaches("udp", 5060, src=src)


@dataclass
class Caller:
    """The control plane's client, reaching the agent over the lab's veth (via a relay)."""

    relay: TcpRelay
    client: AgentClient
    pki: DevMaterial

    def served_certificate(self) -> bytes:
        """DER of the certificate a fresh mTLS handshake is answered with."""
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        ctx.load_cert_chain(str(self.pki.client.cert), str(self.pki.client.key))
        ctx.set_alpn_protocols(["h2"])
        host, port = self.relay.address.split(":")
        with (
            socket.create_connection((host, int(port)), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der

    def entries(self) -> set[tuple[str, str, int]]:
        return {(e.address, e.profile, e.expires_at_unix_ms) for e in self.client.state().entries}


@pytest.fixture(scope="module")
def caller(system: System) -> Iterator[Caller]:
    # Outbound connections leave from the client namespace: every call crosses the veth.
    relay = TcpRelay(system.lab.cli.name, API)
    p = system.pki
    identity = ClientIdentity.from_files(
        ca=p.ca_cert,
        cert=p.client.cert,
        key=p.client.key,
        signing_key=p.signing.key,
        keyid=p.signing.keyid,
    )
    client = AgentClient(relay.address, AGENT_ID, identity, server_name="localhost")
    yield Caller(relay, client, p)
    client.close()
    relay.close()


def der(cert: Path) -> bytes:
    return x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(Encoding.DER)


# --- install ----------------------------------------------------------------------------------


def test_first_install_enables_the_service_but_waits_for_certificates(system: System) -> None:
    c = system.container
    # A booted system of the package's own release, with that release's Python.
    assert c.sh(". /etc/os-release; echo $VERSION_CODENAME").strip() == system.release
    python = c.sh("python3 -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])'").strip()
    c.copy_in(system.debs.current, "/var/tmp/current.deb")
    depends = c.run("dpkg-deb", "-f", "/var/tmp/current.deb", "Depends").stdout
    assert f"python3 (>= {python})" in depends, depends
    done = c.apt("install", "/var/tmp/current.deb")
    assert "it has no certificate yet" in done.stderr + done.stdout
    assert c.path(f"/usr/lib/vicifast-agent/lib/python{python}/site-packages/grpc").is_dir()

    assert c.run("systemctl", "is-enabled", UNIT).stdout.strip() == "enabled"
    assert is_active(c) == "inactive"  # skipped, not failed, and not restarting in a loop
    assert c.unit_property(UNIT, "Result") == "success"
    # systemd 252 (Debian 12): "skipped because of an unmet condition check (Condition...";
    # systemd 257 (Debian 13): "skipped, unmet condition check Condition...".
    skipped = r"skipped(,| because of an) unmet condition check \(?ConditionPathExists=" + TLS
    assert re.search(skipped, c.journal(UNIT))
    user = c.run("getent", "passwd", "vicifast-agent").stdout.split(":")
    assert user[5:] == ["/var/lib/vicifast-agent", "/usr/sbin/nologin\n"]
    assert c.sh(f"stat -c '%a %U:%G' {TLS}").strip() == "750 root:vicifast-agent"
    # postinst compiled the private venv's modules (prerm removes them again)
    assert c.path("/usr/lib/vicifast-agent").is_dir()
    assert c.sh("find /usr/lib/vicifast-agent -name '*.pyc' | head -1").strip()


def test_with_config_and_certificates_it_starts_and_reaches_ready(system: System) -> None:
    c, p = system.container, system.pki
    c.put(f"{TLS}/client-ca.crt", p.ca_cert.read_bytes())
    install_server_cert(c, p.server.cert, p.server.key)
    c.put("/etc/vicifast-agent/agent.toml", config_toml(p).encode())
    assert reaches(system.lab)  # no table yet: nothing is protected
    c.run("systemctl", "start", UNIT)  # Type=notify: returns once READY=1 came (or failed)
    assert is_active(c) == "active"
    assert "in sync" in c.unit_property(UNIT, "StatusText")
    assert table_exists(c)
    assert not reaches(system.lab), "a protected port must be closed to an unknown source"


def test_the_daemon_runs_as_its_user_with_net_admin_only(system: System) -> None:
    c = system.container
    status = dict(
        line.split(":", 1) for line in c.sh(f"cat /proc/{main_pid(c)}/status").splitlines()
    )
    uid = c.run("id", "-u", "vicifast-agent").stdout.strip()
    assert status["Uid"].split() == [uid] * 4
    for name in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
        assert int(status[name], 16) == CAP_NET_ADMIN, name
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Seccomp"].strip() == "2"
    assert c.sh(f"stat -c '%a %U' {STATE}").strip() == "700 vicifast-agent"


def test_unit_exposure_is_at_most_1_5(system: System) -> None:
    out = system.container.run("systemd-analyze", "security", "--no-pager", UNIT).stdout
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
    assert found, out
    print(f"systemd-analyze security {UNIT}: {found.group(1)}")
    assert float(found.group(1)) <= 1.5


# --- running ----------------------------------------------------------------------------------


def test_a_signed_allow_over_the_veth_opens_the_port(system: System, caller: Caller) -> None:
    result = caller.client.allow([Entry("198.18.0.2", 0, "agent-1"), Entry("198.18.0.3")])
    assert len(result.results) == 2
    assert reaches(system.lab)
    assert reaches(system.lab, "198.18.0.3")
    assert not reaches(system.lab, "198.19.0.2")


def test_a_restart_adopts_the_table_without_listing_and_logs_no_warning(
    system: System, caller: Caller
) -> None:
    """Under the exact unit (ProcSubset=pid hides /proc/sys): a clean stop records the ruleset
    generation with the boot id, the next start finds it unchanged and adopts the elements
    without listing them; neither logs anything at warning or above."""
    c = system.container
    before = caller.entries()
    pid = main_pid(c)
    cursor = c.journal_cursor()
    c.run("systemctl", "restart", UNIT)  # Type=notify: returns once the new daemon is READY
    c.await_journal(UNIT, [r"adopted without listing them"], after=cursor, timeout=30)
    assert is_active(c) == "active"
    assert main_pid(c) != pid
    assert caller.entries() == before
    warned = c.run(
        *("journalctl", "--no-pager", "--quiet", "-o", "cat", "-u", UNIT),
        *("--priority", "warning", "--after-cursor", cursor),
    ).stdout
    assert warned == "", f"a normal stop and start logged warnings:\n{warned}"


def test_metrics_and_the_local_cli_work_inside_the_sandbox(system: System) -> None:
    def scrape() -> str:
        with urllib.request.urlopen("http://127.0.0.1:9617/metrics", timeout=5) as r:
            return str(r.read().decode())

    text = system.lab.srv.call(scrape)
    assert re.search(r'^vicifast_agent_entries\{family="ipv4",profile="agent"\} 2\.0$', text, re.M)
    status = system.container.run("vicifast-agent", "status", "--json")
    assert AGENT_ID in status.stdout
    assert system.container.run("vicifast-agent", "--version").stdout.startswith("vicifast-agent ")
    completes = system.container.run(
        "bash",
        "-c",
        "source /usr/share/bash-completion/completions/vicifast-agent;"
        " COMP_WORDS=(vicifast-agent ctl st); COMP_CWORD=2; _vicifast_agent;"
        ' echo "${COMPREPLY[*]}"',
    )
    assert completes.stdout.split() == ["state"]


def test_the_monitoring_kit_is_installed_and_the_metrics_see_the_units_caps(
    system: System,
) -> None:
    kit = system.container.run("ls", "/usr/share/vicifast-agent/monitoring").stdout.split()
    assert sorted(kit) == ["alerts.yml", "alerts_test.yml", "dashboard.json"]

    def scrape() -> str:
        with urllib.request.urlopen("http://127.0.0.1:9617/metrics", timeout=5) as r:
            return str(r.read().decode())

    text = system.lab.srv.call(scrape)
    # LimitNOFILE=16384 in the shipped unit; the memory limit only where the container's
    # systemd was given the memory controller (MemoryMax=768M)
    assert re.search(r"^process_max_fds 16384\.0$", text, re.M)
    assert re.search(r"^process_resident_memory_bytes \d", text, re.M)
    limit = re.search(r"^vicifast_agent_memory_limit_bytes (\S+)$", text, re.M)
    assert limit is None or float(limit.group(1)) == 768 * 2**20


def test_reload_rotates_the_server_certificate(system: System, caller: Caller) -> None:
    c = system.container
    pid = main_pid(c)
    assert caller.served_certificate() == der(system.pki.server.cert)
    rotated = system.pki.issue_server_cert("server-rotated")
    install_server_cert(c, rotated.cert, rotated.key)
    cursor = c.journal_cursor()
    c.run("systemctl", "reload", UNIT)  # ExecReload returns with the daemon's verdict
    c.await_journal(UNIT, [r"^reloaded configuration from "], after=cursor, timeout=20)
    assert caller.served_certificate() == der(rotated.cert)
    assert main_pid(c) == pid  # reloaded in place, not restarted
    assert is_active(c) == "active"
    assert len(caller.client.state().entries) == 2


def test_a_refused_reload_fails_systemctl_reload(system: System, caller: Caller) -> None:
    c = system.container
    pid = main_pid(c)
    c.put("/etc/vicifast-agent/agent.toml", b"no_such_key = 1\n" + config_toml(system.pki).encode())
    cursor = c.journal_cursor()
    refused = c.run("systemctl", "reload", UNIT, check=False)
    assert refused.returncode != 0
    c.await_journal(
        UNIT, [r"^reload refused, keeping the running configuration"], after=cursor, timeout=20
    )
    c.put("/etc/vicifast-agent/agent.toml", config_toml(system.pki).encode())
    c.run("systemctl", "reload", UNIT)
    assert main_pid(c) == pid
    assert is_active(c) == "active"
    assert len(caller.client.state().entries) == 2


def test_the_watchdog_restarts_a_stopped_daemon_and_entries_keep_working(
    system: System, caller: Caller
) -> None:
    c = system.container
    pid, restarts = main_pid(c), int(c.unit_property(UNIT, "NRestarts"))
    before = caller.entries()
    cursor = c.journal_cursor()
    c.run("kill", "-STOP", str(pid))
    assert reaches(system.lab), "the table works on while the daemon is stuck"
    # systemd logs "Started" when the new process says READY=1.
    c.await_journal(
        UNIT,
        [r"Watchdog timeout", r"^Started "],
        after=cursor,
        timeout=30 + 60,  # WatchdogSec=30s, then the restart itself
    )
    assert int(c.unit_property(UNIT, "NRestarts")) > restarts
    assert is_active(c) == "active"
    assert main_pid(c) != pid
    assert caller.entries() == before
    assert reaches(system.lab)


# --- upgrade, remove, purge -------------------------------------------------------------------


@dataclass
class ProbeLoop:
    """Fresh UDP probes (a new flow each) from an allowed source, back to back, in a thread."""

    lab: Lab
    sent: int = 0
    lost: list[int] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            self.sent += 1
            if not self.lab.probe("udp", 5060, src="198.18.0.2").arrived:
                self.lost.append(self.sent)
            self.stop.wait(0.02)


def test_upgrade_restarts_keeps_every_entry_and_drops_no_packet(
    system: System, caller: Caller
) -> None:
    c = system.container
    caller.client.allow([Entry(a, 0, f"bulk-{i}") for i, a in enumerate(EXTRA)])
    before = caller.entries()
    assert len(before) == 2 + len(EXTRA)
    pid = main_pid(c)
    c.copy_in(system.debs.newer, "/var/tmp/newer.deb")

    loop = ProbeLoop(system.lab)
    thread = threading.Thread(target=loop.run, name="probes")
    thread.start()
    try:
        c.apt("install", "/var/tmp/newer.deb")
    finally:
        loop.stop.set()
        thread.join()

    version = upstream_version(system.debs.newer)
    assert c.run("vicifast-agent", "version").stdout.strip() == f"vicifast-agent {version}"
    assert main_pid(c) != pid, "the upgrade restarts the daemon"
    assert is_active(c) == "active"
    assert caller.client.state().version == version
    assert caller.entries() == before
    assert loop.sent > 20
    assert loop.lost == [], f"{len(loop.lost)} of {loop.sent} probes lost during the upgrade"


def test_remove_stops_the_service_and_keeps_table_and_state(system: System) -> None:
    c = system.container
    done = c.apt("remove", "vicifast-agent")
    # The sysadmin is told at remove time that the drop stays in force.
    said = done.stderr + done.stdout
    assert 'its nftables table "inet vicifast" stays and still enforces' in said, said
    assert "apt purge vicifast-agent" in said
    assert is_active(c) == "inactive"
    assert table_exists(c)
    assert reaches(system.lab), "an allowed agent keeps working after remove"
    assert not reaches(system.lab, "198.19.0.2")
    assert c.path(f"{STATE}/state.db").is_file()
    assert c.run("getent", "passwd", "vicifast-agent", check=False).returncode == 0
    assert not c.path("/usr/lib/vicifast-agent").exists()  # no stray bytecode left behind


def test_purge_removes_table_state_and_user(system: System) -> None:
    c = system.container
    c.apt("purge", "vicifast-agent")
    assert not table_exists(c)
    assert not c.path(STATE).exists()
    assert not c.path("/etc/vicifast-agent").exists()
    assert c.run("getent", "passwd", "vicifast-agent", check=False).returncode == 2
    assert c.run("getent", "group", "vicifast-agent", check=False).returncode == 2
    assert c.run("dpkg-query", "-W", "vicifast-agent", check=False).returncode != 0
