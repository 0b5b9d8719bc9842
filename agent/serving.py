"""The thread a ``socketserver`` server (the metrics listener, the local socket) serves on."""

from __future__ import annotations

import socketserver
import threading

# serve_forever notices shutdown() only between polls: a stop waits up to this long.
SERVE_POLL_S = 0.1


def serving_thread(server: socketserver.BaseServer, name: str) -> threading.Thread:
    """A daemon thread (not started yet) running ``server.serve_forever``."""
    return threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": SERVE_POLL_S},
        name=name,
        daemon=True,
    )
