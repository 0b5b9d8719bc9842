"""The local socket's listener in-process: one line in, one line out, and who owns the path."""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import LocalConfig
from agent.errors import AgentError, InvalidArgument
from agent.local.access import Peer
from agent.local.client import LocalCallError, LocalClient, LocalUnreachable
from agent.local.server import LocalServer
from agent.local.wire import LocalRequest


class EchoService:
    """Stands in for LocalService: answers with what it was asked and who asked."""

    def __init__(self) -> None:
        self.seen: list[tuple[LocalRequest, Peer]] = []

    def handle(self, request: LocalRequest, peer: Peer) -> dict[str, Any]:
        self.seen.append((request, peer))
        if request.args.get("fail"):
            raise InvalidArgument("invalid_address", "as asked")
        return {"op": request.op, "uid": peer.uid, "pid": peer.pid}


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[LocalServer, EchoService, LocalConfig]]:
    cfg = LocalConfig(socket=tmp_path / "run" / "local.sock", rate_limit_burst=2)
    service = EchoService()
    server = LocalServer(lambda: cfg, service)  # type: ignore[arg-type]
    server.start()
    yield server, service, cfg
    server.stop()


def test_requests_reach_the_service_with_the_kernel_reported_peer(served: Any) -> None:
    _, _, cfg = served
    answer = LocalClient(cfg.socket).call("status")
    assert answer == {"op": "status", "uid": os.geteuid(), "pid": os.getpid()}
    assert stat.S_IMODE(os.stat(cfg.socket).st_mode) == 0o660


def test_refusals_carry_the_reason_word(served: Any) -> None:
    _, _, cfg = served
    with pytest.raises(LocalCallError) as err:
        LocalClient(cfg.socket).call("list", fail=True)
    assert err.value.reason == "invalid_address"


def test_changes_are_rate_limited_reads_are_not(served: Any) -> None:
    _, service, cfg = served
    client = LocalClient(cfg.socket)
    client.call("allow")
    client.call("revoke")
    with pytest.raises(LocalCallError) as err:
        client.call("allow")
    assert err.value.reason == "rate_limited"
    client.call("status")
    assert [r.op for r, _ in service.seen] == ["allow", "revoke", "status"]


def test_a_live_socket_is_not_taken_over_and_stop_removes_only_its_own(served: Any) -> None:
    server, _, cfg = served
    second = LocalServer(lambda: cfg, EchoService())  # type: ignore[arg-type]
    with pytest.raises(AgentError) as err:
        second.start()
    assert err.value.reason == "local_socket_in_use"
    server.stop()
    assert not cfg.socket.exists()
    with pytest.raises(LocalUnreachable):
        LocalClient(cfg.socket).call("status")


def test_a_stale_socket_is_replaced_and_a_regular_file_is_refused(tmp_path: Path) -> None:
    cfg = LocalConfig(socket=tmp_path / "local.sock")
    first = LocalServer(lambda: cfg, EchoService())  # type: ignore[arg-type]
    first.start()
    # Dies without cleaning up: the listener goes, the socket file stays.
    first._server.shutdown()  # type: ignore[union-attr]
    first._server.server_close()  # type: ignore[union-attr]
    again = LocalServer(lambda: cfg, EchoService())  # type: ignore[arg-type]
    again.start()
    assert LocalClient(cfg.socket).call("status")["op"] == "status"
    again.stop()
    cfg.socket.write_text("not a socket")
    with pytest.raises(AgentError) as err:
        LocalServer(lambda: cfg, EchoService()).start()  # type: ignore[arg-type]
    assert err.value.reason == "local_socket_failed"


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file another group needs root")
def test_a_reload_gives_the_socket_file_the_new_group(tmp_path: Path) -> None:
    current = [LocalConfig(socket=tmp_path / "local.sock")]
    server = LocalServer(lambda: current[0], EchoService())  # type: ignore[arg-type]
    server.start()
    try:
        assert os.stat(current[0].socket).st_gid == 0
        current[0] = LocalConfig(socket=current[0].socket, group="nogroup")  # what a reload does
        deadline = time.monotonic() + 10
        while os.stat(current[0].socket).st_gid != 65534:
            assert time.monotonic() < deadline, "the socket kept its old group"
            threading.Event().wait(0.05)
    finally:
        server.stop()
