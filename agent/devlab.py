"""A throwaway agent for demos, tests and benches: dev PKI, config, the real daemon process.

DEV/TEST ONLY. Owns a directory (PKI, config, state, log) and the daemon process it starts in a
given network namespace; it never touches the host namespace's ruleset. The daemon is the real
``python -m agent run`` started with ``ip netns exec``; readiness is learned the way systemd
learns it, from ``READY=1`` on a ``NOTIFY_SOCKET`` this harness listens on (a pathname socket,
so it works across network namespaces), never by sleeping.

A gRPC listener inside a namespace is reachable from the host namespace through ``TcpRelay``:
a loopback listener in the caller's namespace whose accepted connections are forwarded to an
address inside the namespace. TLS passes through it untouched, so the handshake is the real one.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from agent.devpki import DevMaterial, make_dev_pki
from agent.rpc.client import AgentClient, ClientIdentity

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
REPO_ROOT = Path(__file__).resolve().parent.parent
API_PORT = 7443
METRICS_PORT = 9617


def enter_netns(netns: str) -> None:
    """Move the calling thread (only it) into ``netns``."""
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({netns}): {os.strerror(err)}")
    finally:
        os.close(fd)


class NotifyListener:
    """The systemd side of sd_notify: a datagram socket read continuously, as systemd does.

    A reader thread takes every datagram at once: left unread, the socket's small queue
    (``net.unix.max_dgram_qlen``) fills after a few STATUS= updates and the daemon's next
    ``sd_notify`` blocks. ``wait_for`` and ``drain`` consume the collected messages in order.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        # The daemon may run as another user (the packaging tests' unprivileged unit).
        os.chmod(path, 0o666)  # noqa: S103
        self.messages: list[dict[str, str]] = []
        self._cursor = 0  # messages before it were consumed by wait_for/drain
        self._arrived = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._read_loop, name="notify", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=5)
        self.sock.close()
        self.path.unlink(missing_ok=True)

    def _read_loop(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            text = data.decode("utf-8", "replace")
            fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
            with self._arrived:
                self.messages.append(fields)
                self._arrived.notify_all()

    def wait_for(self, key: str, value: str | None = None, *, timeout: float) -> dict[str, str]:
        """Block until an unconsumed message carries ``key`` (``value`` if given); return it."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while True:
                while self._cursor < len(self.messages):
                    fields = self.messages[self._cursor]
                    self._cursor += 1
                    if key in fields and value in (None, fields[key]):
                        return fields
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {key}{'=' + value if value else ''} within {timeout} s")
                self._arrived.wait(left)

    def drain(self) -> list[dict[str, str]]:
        """Every message not consumed yet, without waiting."""
        with self._arrived:
            out = self.messages[self._cursor :]
            self._cursor = len(self.messages)
            return out


class TcpRelay:
    """Forward connections from a loopback port in this namespace to ``target`` in ``netns``."""

    def __init__(self, netns: str, target: tuple[str, int]) -> None:
        self.netns = netns
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self._closed = False
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept_loop, name="relay", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for c in list(self._conns):
            with contextlib.suppress(OSError):
                c.close()
        self._thread.join(timeout=5)

    def _accept_loop(self) -> None:
        # Outbound sockets are made by this thread, which lives in the target namespace; the
        # listener was made before, in the caller's namespace, and stays there.
        enter_netns(self.netns)
        while not self._closed:
            try:
                inbound, _ = self.listener.accept()
            except OSError:
                return
            try:
                outbound = socket.create_connection(self.target, timeout=5)
                outbound.settimeout(None)
            except OSError:
                inbound.close()  # the caller sees the connection refused, as it would directly
                continue
            self._conns += [inbound, outbound]
            for a, b in ((inbound, outbound), (outbound, inbound)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()


def open_connections(
    netns: str,
    target: tuple[str, int],
    sources: Iterable[str],
    each: int,
    first_bytes: bytes = b"",
) -> list[socket.socket]:
    """``each`` TCP connections to ``target`` from every address of ``sources`` (loopback
    addresses such as 127.0.1.N, each its own source), made inside ``netns``; each sends
    ``first_bytes`` (e.g. the start of a TLS ClientHello) and then nothing: the idle or
    half-handshaken connections of a flood. The caller closes them."""
    made: list[socket.socket] = []
    failure: list[OSError] = []

    def run() -> None:
        enter_netns(netns)  # this thread only; the sockets stay in netns afterwards
        try:
            for src in sources:
                for _ in range(each):
                    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    made.append(s)
                    s.bind((src, 0))
                    s.connect(target)
                    if first_bytes:
                        s.sendall(first_bytes)
        except OSError as exc:
            failure.append(exc)

    t = threading.Thread(target=run, name="flood")
    t.start()
    t.join()
    if failure:
        for s in made:
            s.close()
        raise failure[0]
    return made


def closed_by_peer(s: socket.socket) -> bool:
    """Whether the other end has closed or reset ``s`` (reads what is pending, never waits)."""
    s.setblocking(False)
    try:
        while True:
            data = s.recv(65536)
            if data == b"":
                return True
    except BlockingIOError:
        return False
    except OSError:  # reset, or broken
        return True


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


@dataclass
class DevAgent:
    """A daemon with throwaway PKI and config in ``directory``, run inside ``netns``.

    ``extra_toml`` is appended to the generated config (whole tables, e.g. ``[ttl]\\nmin = 1``);
    the generated part has ``agent_id``, ``[firewall]`` (table name, test ranges permitted),
    ``[state]``, ``[metrics]`` and the dev PKI's ``[api]``/``[signing.trusted_keys]``.
    """

    directory: Path
    netns: str
    agent_id: str = "dev-agent"
    table: str = "vicifast"
    firewall_toml: str = ""
    extra_toml: str = ""
    api_listen: str = f"127.0.0.1:{API_PORT}"
    metrics_listen: str = f"127.0.0.1:{METRICS_PORT}"
    pki: DevMaterial = field(init=False)
    config_path: Path = field(init=False)
    notify: NotifyListener | None = field(init=False, default=None)
    process: subprocess.Popen[bytes] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.pki = make_dev_pki(self.directory / "pki", self.agent_id)
        self.config_path = self.directory / "agent.toml"
        self.write_config()

    @property
    def state_dir(self) -> Path:
        return self.directory / "state"

    @property
    def local_socket(self) -> Path:
        """The local socket, outside the host's /run and short enough for sun_path (108)."""
        return Path(tempfile.gettempdir()) / f"vf-local-{self.netns}.sock"

    @property
    def log_path(self) -> Path:
        return self.directory / "daemon.log"

    def config_text(self, *, trusted_keys: dict[str, str] | None = None) -> str:
        """The config this agent runs with (the dev PKI's keys unless ``trusted_keys``)."""
        return "\n".join(
            [
                f'agent_id = "{self.agent_id}"',
                "",
                "[firewall]",
                f'table = "{self.table}"',
                "permit_test_ranges = true",
                self.firewall_toml,
                "",
                "[state]",
                f'directory = "{self.state_dir}"',
                "",
                "[metrics]",
                f'listen = "{self.metrics_listen}"',
                "",
                self.pki.config_toml(listen=self.api_listen, trusted_keys=trusted_keys),
                "" if "[local]" in self.extra_toml else f'[local]\nsocket = "{self.local_socket}"',
                self.extra_toml,
            ]
        )

    def write_config(self, text: str | None = None) -> None:
        self.config_path.write_text(self.config_text() if text is None else text)

    # --- the process ----------------------------------------------------------------------------

    def argv(self) -> list[str]:
        return [
            "ip",
            "netns",
            "exec",
            self.netns,
            sys.executable,
            "-m",
            "agent",
            "run",
            "--config",
            str(self.config_path),
        ]

    def start(self, *, timeout: float = 30.0, wait_ready: bool = True) -> None:
        """Start the daemon; by default return once it said READY=1."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("the daemon is already running")
        if self.notify is None:
            self.notify = NotifyListener(self.directory / "notify.sock")
        path = os.environ.get("PYTHONPATH", "")
        env = {
            **os.environ,
            "NOTIFY_SOCKET": str(self.notify.path),
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), path) if p),
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("INVOCATION_ID", None)
        env.pop("JOURNAL_STREAM", None)  # log to the file below, not the journal
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv(), env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT
            )
        if wait_ready:
            self.wait_ready(timeout=timeout)

    def wait_ready(self, *, timeout: float = 30.0) -> dict[str, str]:
        assert self.notify is not None
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"daemon exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            with contextlib.suppress(TimeoutError):
                return self.notify.wait_for("READY", "1", timeout=min(left, 0.5))
        raise TimeoutError(f"daemon not READY within {timeout} s:\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def send_signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def reload(self, *, timeout: float = 30.0) -> None:
        """SIGHUP, then wait for the daemon's READY=1 that ends the reload."""
        assert self.notify is not None
        self.notify.drain()
        self.send_signal(signal.SIGHUP)
        self.notify.wait_for("RELOADING", "1", timeout=timeout)
        self.notify.wait_for("READY", "1", timeout=timeout)

    def stop(self, *, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        finally:
            self.process = None

    def kill(self) -> None:
        """SIGKILL and reap: a crash at whatever point the daemon was."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def __enter__(self) -> DevAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.stop(timeout=10)
        self.kill()
        if self.notify is not None:
            self.notify.close()
            self.notify = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # --- callers ----------------------------------------------------------------------------

    def api_target(self) -> tuple[str, int]:
        host, _, port = self.api_listen.rpartition(":")
        return host.strip("[]"), int(port)

    def relay(self) -> TcpRelay:
        """A loopback port in the caller's namespace that reaches the agent's gRPC listener."""
        return TcpRelay(self.netns, self.api_target())

    def identity(self) -> ClientIdentity:
        """The dev control plane's mTLS certificate and signing key."""
        p = self.pki
        return ClientIdentity.from_files(
            ca=p.ca_cert,
            cert=p.client.cert,
            key=p.client.key,
            signing_key=p.signing.key,
            keyid=p.signing.keyid,
        )

    def client(self, target: str) -> AgentClient:
        """A control-plane client for ``target`` (e.g. ``relay().address``)."""
        return AgentClient(target, self.agent_id, self.identity(), server_name="localhost")

    def client_argv(self) -> list[str]:
        """``vicifast-agent ctl`` options that reach this agent from inside its namespace."""
        p = self.pki
        return [
            "--target",
            self.api_listen,
            "--agent-id",
            self.agent_id,
            "--ca",
            str(p.ca_cert),
            "--cert",
            str(p.client.cert),
            "--key",
            str(p.client.key),
            "--signing-key",
            str(p.signing.key),
            "--keyid",
            p.signing.keyid,
            "--server-name",
            "localhost",
        ]


@contextlib.contextmanager
def scratch_netns(prefix: str = "vf-dev") -> Iterator[str]:
    """A fresh namespace with only ``lo`` (up); deleted on exit whatever happened."""
    name = f"{prefix}-{os.urandom(3).hex()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)
