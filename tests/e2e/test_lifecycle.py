"""Restart, reboot, crash and systemd behaviour of the real daemon process.

Real signals to the real process, real packets between namespaces, the real state directory.
"""

from __future__ import annotations

import random
import signal
import socket
import sqlite3
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from e2ekit import RawCaller
from lifecycle_kit import KIND, Watcher, allow_set_addresses, kernel_entries
from netlab import Lab, Netns, wait_until

from agent.devlab import DevAgent, TcpRelay, scratch_netns
from agent.rpc.client import AgentCallError, AgentClient, ClientIdentity, Entry
from agent.rpc.pb import agent_pb2

SIP = 5060
# Never set: waiting on it paces a sender, it never stands in for an event.
_PACE = threading.Event()


class UdpStream:
    """A softphone: one datagram with a sequence number every ``interval`` s; a receiver."""

    def __init__(self, lab: Lab, interval: float = 0.02) -> None:
        self.received: set[int] = set()
        self.sent = 0
        self.interval = interval
        self._stop = threading.Event()
        self._rx = lab.srv.socket(4)
        self._rx.bind((lab.addr.server4, SIP))
        self._tx = lab.cli.socket(4)
        self._tx.bind((lab.addr.client4, 0))
        self._dst = (lab.addr.server4, SIP)
        self._threads = [
            threading.Thread(target=self._send, daemon=True),
            threading.Thread(target=self._receive, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _send(self) -> None:
        while not self._stop.is_set():
            self._tx.sendto(self.sent.to_bytes(4, "big"), self._dst)
            self.sent += 1
            _PACE.wait(self.interval)

    def _receive(self) -> None:
        self._rx.settimeout(0.5)
        while True:
            try:
                data = self._rx.recv(64)
            except TimeoutError:
                if self._stop.is_set():
                    return
                continue
            except OSError:
                return
            self.received.add(int.from_bytes(data, "big"))

    def stop(self) -> None:
        self._stop.set()
        self._threads[0].join()
        last = self.sent - 1
        wait_until(lambda: last in self.received, timeout=2.0, what="the last datagram")
        self._rx.close()
        self._tx.close()

    def lost(self) -> list[int]:
        return sorted(set(range(self.sent)) - self.received)


def test_restart_drops_no_packet_of_a_softphone(
    lab: Lab, agent: DevAgent, client: AgentClient
) -> None:
    client.allow([Entry(lab.addr.client4, 600, "alice")])
    stream = UdpStream(lab)
    try:
        wait_until(lambda: len(stream.received) >= 5, timeout=5.0, what="packets flowing")
        agent.stop()
        agent.start()
        seen = len(stream.received)
        wait_until(lambda: len(stream.received) >= seen + 5, timeout=5.0, what="packets after")
    finally:
        stream.stop()
    assert stream.sent > 20
    assert stream.lost() == []


UNCHANGED = "ruleset unchanged since the last clean stop"


def _starts_logged(dev: DevAgent, text: str) -> int:
    return dev.log_path.read_text(errors="replace").count(text)


def test_a_clean_restart_of_an_unchanged_ruleset_adopts_it_without_listing(
    lab: Lab, agent: DevAgent, client: AgentClient
) -> None:
    client.allow([Entry("198.18.6.1", 600, "alice"), Entry("198.18.6.2", 600, "bob")])
    before = kernel_entries(lab.srv, agent.table)
    agent.stop()
    agent.start()
    assert _starts_logged(agent, UNCHANGED) == 1
    assert kernel_entries(lab.srv, agent.table) == before
    assert {e.address for e in client.state().entries} == {"198.18.6.1", "198.18.6.2"}


def test_sigterm_ends_open_event_streams_at_once_and_cleanly(
    agent: DevAgent, client: AgentClient, raw: RawCaller
) -> None:
    client.allow([Entry("198.18.6.3", 600, "alice")])
    stream = raw.stub.WatchEvents(agent_pb2.WatchEventsRequest(), timeout=60)
    assert next(stream).kind == KIND.ADDED  # the stream is open and was served

    assert agent.stop() == 0

    # Ended by the daemon with OK, not cut off (CANCELLED, UNAVAILABLE) when the grace ran out.
    assert list(stream) == []
    assert stream.code() == grpc.StatusCode.OK


def test_a_change_while_stopped_is_converged_at_the_next_start(
    lab: Lab, agent: DevAgent, client: AgentClient
) -> None:
    client.allow([Entry("198.18.6.1", 600, "alice"), Entry("198.18.6.2", 600, "bob")])
    agent.stop()
    # While nobody watches: one element gone, one the agent never granted.
    lab.srv.nft("delete", "element", "inet", agent.table, "allow4_agent", "{ 198.18.6.2 }")
    lab.srv.nft("add", "element", "inet", agent.table, "allow4_agent", "{ 198.18.6.9 }")
    agent.start()
    assert _starts_logged(agent, UNCHANGED) == 0
    assert {a for p, a in kernel_entries(lab.srv, agent.table)} == {"198.18.6.1", "198.18.6.2"}
    # A crash records no generation: the start after it lists the elements again.
    client.allow([Entry("198.18.6.3", 600, "carol")])
    agent.send_signal(signal.SIGKILL)
    assert agent.process is not None
    agent.process.wait()
    agent.start()
    assert _starts_logged(agent, UNCHANGED) == 0
    assert {e.address for e in client.state().entries} == {"198.18.6.1", "198.18.6.2", "198.18.6.3"}


def test_kill_9_during_a_stream_keeps_every_acknowledged_change(
    lab: Lab, agent: DevAgent, relay: TcpRelay, client: AgentClient
) -> None:
    pool = [f"198.18.{1 + i // 200}.{1 + i % 200}" for i in range(40)]
    acked: dict[str, bool] = {}  # address -> allowed after its last acknowledged request
    inflight: set[str] = set()
    kill_after = random.randint(200, 600)
    stop = threading.Event()

    def stream() -> None:
        for i in range(1000):
            if stop.is_set():
                return
            addr = pool[i % len(pool)]
            allow = (i // len(pool)) % 2 == 0
            inflight.add(addr)
            try:
                if allow:
                    client.allow([Entry(addr, 600, f"user{i % len(pool)}")])
                else:
                    client.revoke([addr])
            except AgentCallError:
                return  # the daemon died under this request: its outcome is unknown
            inflight.discard(addr)
            acked[addr] = allow
            if len(acked) and i + 1 >= kill_after:
                stop.set()

    client.attempts = 1
    worker = threading.Thread(target=stream)
    worker.start()
    stop.wait(60)
    agent.kill()
    worker.join()
    agent.start()
    with agent.client(relay.address) as fresh:
        state = {e.address for e in fresh.state().entries}
    kernel = {a for _, a in kernel_entries(lab.srv, agent.table)}
    assert kernel == state, "kernel and store disagree after the crash"
    for addr, allowed in acked.items():
        if addr in inflight:
            continue
        assert (addr in state) == allowed, f"{addr}: acknowledged {allowed}, found otherwise"


def test_reboot_restores_unexpired_entries_with_their_remaining_time(
    lab: Lab, tmp_path: Path
) -> None:
    with DevAgent(tmp_path / "agent", lab.srv.name, extra_toml="[ttl]\nmin = 1\n") as dev:
        dev.start()
        relay = dev.relay()
        with dev.client(relay.address) as c:
            c.allow([Entry("198.18.5.1", 2, "short")])
            c.allow([Entry("198.18.5.2", 600, "long"), Entry("198.18.5.3", 3600, "longer")])
            stored = {e.address: e.expires_at_unix_ms for e in c.state().entries}
            version = c.state().state_version
        relay.close()
        dev.stop()
        wait_until(
            lambda: time.time() * 1000 > stored["198.18.5.1"] + 200,
            timeout=5.0,
            what="the short entry's time to pass",
        )
        with scratch_netns("vf-boot") as fresh:
            dev.netns = fresh
            dev.start()
            relay = dev.relay()
            watcher = Watcher(dev, relay, version)
            try:
                _, ev = watcher.wait_for(lambda e: e.kind == KIND.EXPIRED, timeout=5.0)
                assert ev.entry.address == "198.18.5.1"
                elements = allow_set_addresses(Netns(fresh), dev.table, "allow4_agent")
                now_ms = time.time() * 1000
                assert set(elements) == {"198.18.5.2", "198.18.5.3"}
                for addr, left_s in elements.items():
                    assert abs(left_s * 1000 - (stored[addr] - now_ms)) <= 2000
                with dev.client(relay.address) as c:
                    assert {e.address for e in c.state().entries} == {"198.18.5.2", "198.18.5.3"}
            finally:
                watcher.close()
                relay.close()
                dev.stop()


@pytest.fixture
def watchdog_agent(lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[DevAgent]:
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    with DevAgent(tmp_path / "agent", lab.srv.name) as dev:
        dev.start()
        yield dev


def _pings_stop(dev: DevAgent, *, quiet: float, within: float) -> bool:
    """Whether a ``quiet`` s gap without WATCHDOG=1 begins within ``within`` s."""
    assert dev.notify is not None
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            dev.notify.wait_for("WATCHDOG", "1", timeout=quiet)
        except TimeoutError:
            return True
    return False


def test_watchdog_pings_only_while_the_work_loop_turns(watchdog_agent: DevAgent, lab: Lab) -> None:
    dev = watchdog_agent
    assert dev.notify is not None
    dev.notify.wait_for("WATCHDOG", "1", timeout=3.0)
    dev.send_signal(signal.SIGSTOP)
    try:
        assert _pings_stop(dev, quiet=1.5, within=2.0)
    finally:
        dev.send_signal(signal.SIGCONT)
    dev.notify.wait_for("WATCHDOG", "1", timeout=3.0)

    # A writer stuck on its database (another process holds the write lock) stops the pings.
    relay = dev.relay()
    db = sqlite3.connect(dev.state_dir / "state.db", timeout=0, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        outcome: list[object] = []

        def allow() -> None:
            with dev.client(relay.address) as c:
                c.attempts = 1
                try:
                    outcome.append(c.allow([Entry(lab.addr.client4, 600, "a")]))
                except AgentCallError as exc:
                    outcome.append(exc)

        t = threading.Thread(target=allow)
        t.start()
        assert _pings_stop(dev, quiet=1.5, within=4.0)
    finally:
        db.execute("ROLLBACK")
        db.close()
    dev.notify.wait_for("WATCHDOG", "1", timeout=8.0)
    t.join()
    relay.close()


def test_sighup_rotates_certificate_and_keys_without_a_failed_call(
    lab: Lab, agent: DevAgent, relay: TcpRelay, client: AgentClient
) -> None:
    pki = agent.pki
    failures: list[Exception] = []
    calls = 0
    stop = threading.Event()

    def caller() -> None:
        nonlocal calls
        while not stop.is_set():
            try:
                client.allow([Entry(lab.addr.client4, 600, "alice")])
                calls += 1
            except AgentCallError as exc:
                failures.append(exc)

    t = threading.Thread(target=caller)
    t.start()
    try:
        wait_until(lambda: calls >= 5, timeout=10.0, what="calls flowing")
        rotated = pki.issue_server_cert("server-rotated")
        pki.server.cert.write_bytes(rotated.cert.read_bytes())
        pki.server.key.write_bytes(rotated.key.read_bytes())
        new_key = pki.new_signing_key("signing-2")
        both = {pki.signing.keyid: pki.signing.public_b64, new_key.keyid: new_key.public_b64}
        agent.write_config(agent.config_text(trusted_keys=both))
        agent.reload()
        seen = calls
        wait_until(lambda: calls >= seen + 5, timeout=10.0, what="calls after the reload")
    finally:
        stop.set()
        t.join()
    assert failures == []

    host, port = relay.address.split(":")
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    ctx.load_cert_chain(str(pki.client.cert), str(pki.client.key))
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, int(port))) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        served = tls.getpeercert(binary_form=True)
    pem = rotated.cert.read_text()
    assert served == ssl.PEM_cert_to_DER_cert(pem[pem.index("-----BEGIN") :])

    new_identity = ClientIdentity.from_files(
        ca=pki.ca_cert,
        cert=pki.client.cert,
        key=pki.client.key,
        signing_key=new_key.key,
        keyid=new_key.keyid,
    )
    with AgentClient(relay.address, agent.agent_id, new_identity, server_name="localhost") as c:
        c.allow([Entry(lab.addr.client4_alt, 600, "bob")])
        agent.write_config(agent.config_text(trusted_keys={new_key.keyid: new_key.public_b64}))
        agent.reload()
        c.allow([Entry(lab.addr.client4_alt, 600, "bob")])
    with pytest.raises(AgentCallError) as refused:
        client.allow([Entry(lab.addr.client4, 600, "alice")])
    assert refused.value.code.name == "UNAUTHENTICATED"


def test_an_invalid_config_on_sighup_is_refused_and_the_old_one_stays(
    agent: DevAgent, client: AgentClient
) -> None:
    good = agent.config_path.read_text()
    agent.write_config(good + "\n[verify]\ninterval_s = -1\n")
    agent.reload()
    assert client.state().agent_id == agent.agent_id
    assert "reload refused" in agent.log_tail()
    agent.write_config(good)


def test_a_corrupt_store_is_rebuilt_from_the_kernel_and_asks_for_a_sync(
    lab: Lab, agent: DevAgent, relay: TcpRelay, client: AgentClient
) -> None:
    client.allow([Entry(lab.addr.client4, 600, "alice")])
    agent.stop()
    db = agent.state_dir / "state.db"
    with db.open("r+b") as f:
        f.write(b"this is not a database" * 200)
    agent.start()
    with agent.client(relay.address) as c:
        state = c.state()
        assert [(e.address, e.subject) for e in state.entries] == [(lab.addr.client4, "alice")]
        assert not state.ruleset_in_sync
        watcher = Watcher(agent, relay, 0)
        try:
            _, ev = watcher.wait_for(lambda e: e.kind == KIND.RESYNC_REQUIRED, timeout=5.0)
            assert "send a Sync" in ev.detail
        finally:
            watcher.close()
        assert "damaged" in agent.log_tail(200)
        assert list(agent.state_dir.glob("state.db.corrupt-*"))
        c.sync([Entry(lab.addr.client4, 600, "alice")])
        assert c.state().ruleset_in_sync
    assert lab.reaches("udp", SIP, family=4)


def test_a_full_disk_fails_requests_with_unavailable_and_changes_nothing(
    lab: Lab, tmp_path: Path
) -> None:
    directory = tmp_path / "agent"
    state = directory / "state"
    state.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(state)], check=True)
    try:
        with DevAgent(directory, lab.srv.name) as dev:
            dev.start()
            relay = dev.relay()
            try:
                with dev.client(relay.address) as c:
                    c.attempts = 1
                    c.allow([Entry("198.18.7.1", 600, "before")])
                    filler = state / "filler"
                    with filler.open("wb") as f:
                        try:
                            while True:
                                f.write(b"\0" * 65536)
                                f.flush()
                        except OSError:
                            pass
                    refused = None
                    for i in range(2, 250):
                        addr = f"198.18.7.{i}"
                        try:
                            c.allow([Entry(addr, 600, "during")])
                        except AgentCallError as exc:
                            refused = (addr, exc)
                            break
                    assert refused is not None, "the full disk never refused a request"
                    addr, exc = refused
                    assert exc.code.name == "UNAVAILABLE"
                    assert addr not in allow_set_addresses(lab.srv, dev.table, "allow4_agent")
                    kernel = {a for _, a in kernel_entries(lab.srv, dev.table)}
                    assert kernel == {e.address for e in c.state().entries}
                    filler.unlink()
                    c.allow([Entry(addr, 600, "after")])
                    assert addr in allow_set_addresses(lab.srv, dev.table, "allow4_agent")
            finally:
                relay.close()
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)
