"""The thread a ``socketserver`` server (the metrics listener, the local socket) serves on.

The thread is a supervised loop (``agent.supervise``): the server's poll loop beats on every turn
(``SupervisedServer.service_actions``, at least every ``SERVE_POLL_S``), and an unexpected
exception out of ``serve_forever`` is counted, backed off from and serving starts again.
"""

from __future__ import annotations

import socketserver
import threading
import time
from collections.abc import Callable

from agent.supervise import Supervision

# serve_forever notices shutdown() only between polls: a stop waits up to this long.
SERVE_POLL_S = 0.1


class SupervisedServer(socketserver.BaseServer):
    """Mixin: ``on_turn`` runs at every turn of ``serve_forever`` (set by ``serving_thread``)."""

    on_turn: Callable[[], None] = staticmethod(lambda: None)
    stopping = False

    def service_actions(self) -> None:
        self.on_turn()
        super().service_actions()

    def shutdown(self) -> None:
        self.stopping = True  # also ends a back-off: no serving again after a stop
        super().shutdown()


def serving_thread(
    server: socketserver.BaseServer, name: str, supervision: Supervision | None = None
) -> threading.Thread:
    """A daemon thread (not started yet) running ``server.serve_forever`` as loop ``name``."""
    sup = supervision if supervision is not None else Supervision()

    def turn() -> None:
        sup.checkpoint(name)
        sup.beat(name)

    if isinstance(server, SupervisedServer):
        server.on_turn = turn

    def serve() -> None:
        sup.watch(name)
        try:
            while True:
                try:
                    server.serve_forever(poll_interval=SERVE_POLL_S)
                except Exception as exc:  # noqa: BLE001  # counted, backed off, served again
                    time.sleep(sup.fault(name, exc))
                    if not getattr(server, "stopping", False):
                        continue
                return  # shutdown() asked for it
        finally:
            sup.unwatch(name)

    return threading.Thread(target=serve, name=name, daemon=True)
