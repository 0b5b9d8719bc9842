"""Daemon lifecycle: wire the parts, converge, serve, notify systemd, reload, shut down.

Owns the process: signals (SIGTERM/SIGINT stop, SIGHUP reloads), sd_notify READY/STATUS/WATCHDOG,
routine retention. It never flushes or deletes the table on the way out: entries keep working
while the daemon is stopped, restarting or being upgraded.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

import systemd.daemon  # Debian's python3-systemd
import systemd.journal

from agent.config import AgentConfig, load_config
from agent.engine import Engine
from agent.errors import AgentError
from agent.reconcile import converge
from agent.rpc.auth import CallerPolicy
from agent.rpc.server import AgentServer
from agent.rpc.service import FirewallAgentService, Health, Settings
from agent.rpc.signing import trust_policy_from_config
from agent.rules.nft import NftAdapter
from agent.rules.table import FirewallTable
from agent.state import Limits
from agent.store import Store

log = logging.getLogger("vicifast-agent")
PURGE_EVERY_S = 300.0
HISTORY = 10_000


def _notify(message: str) -> None:
    """sd_notify through libsystemd's binding; a no-op when not under systemd."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    systemd.daemon.notify(message)


def setup_logging() -> None:
    handler: logging.Handler
    if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"):
        handler = systemd.journal.JournalHandler(SYSLOG_IDENTIFIER="vicifast-agent")
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


def settings_for(cfg: AgentConfig) -> Settings:
    return Settings(cfg, trust_policy_from_config(cfg), CallerPolicy(cfg.api.allowed_identities))


class Daemon:
    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.cfg = load_config(config_path)
        self.stop_requested = threading.Event()
        self.reload_requested = threading.Event()
        self.last_verified_at_ms = 0

    def _health(self) -> Health:
        return Health(in_sync=True, last_verified_at_ms=self.last_verified_at_ms)

    def run(self) -> int:
        cfg = self.cfg
        cfg.state.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.store = Store.open(cfg.state.directory / "state.db")
        self.table = FirewallTable(cfg.firewall, NftAdapter())
        self.table.install()
        features = self.table.probe()
        log.info(
            "kernel %s, nft %s, re-add refreshes timeout: %s, destroy: %s",
            features.kernel_release,
            features.nft_version,
            features.readd_updates_timeout,
            features.destroy_supported,
        )
        skew_ms = cfg.signing.clock_skew_s * 1000
        self.engine = Engine(
            store=self.store,
            table=self.table,
            limits=Limits(
                max_entries=cfg.limits.max_entries,
                set_size={4: cfg.firewall.set_size_ipv4, 6: cfg.firewall.set_size_ipv6},
            ),
            profiles=cfg.profile_names,
            forget_window_ms=cfg.signing.max_window_s * 1000 + skew_ms,
            history=HISTORY,
        )
        self.engine.load()
        result = converge(self.engine.view, self.store, self.table, self.engine.now_ms())
        self.last_verified_at_ms = self.engine.now_ms()
        self.engine.start()
        self.service = FirewallAgentService(self.engine, settings_for(cfg), health=self._health)
        self.server = AgentServer(cfg, self.service)
        self.server.start()
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)
        entries, version = self.engine.snapshot()
        log.info(
            "ready: %d entries, state_version %d, restored %d, listening on %s",
            len(entries),
            version,
            result.restored,
            cfg.api.listen,
        )
        _notify(f"READY=1\nSTATUS={len(entries)} entries, in sync")
        self._loop()
        _notify("STOPPING=1")
        self.server.stop(grace=10.0)
        self.engine.stop()
        self.store.close()
        log.info("stopped; the table and its entries stay in place")
        return 0

    def _loop(self) -> None:
        next_purge = time.monotonic()
        while not self.stop_requested.is_set():
            self.stop_requested.wait(1.0)
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                self.reload()
            # The watchdog is fed only while the engine's writer loop keeps turning.
            if time.monotonic() - self.engine.last_loop_at < 5.0:
                _notify("WATCHDOG=1")
            if time.monotonic() >= next_purge:
                next_purge = time.monotonic() + PURGE_EVERY_S
                try:
                    self.store.purge(
                        self.engine.now_ms(),
                        audit_retention_ms=self.cfg.state.audit_retention_days * 86_400_000,
                        max_events=HISTORY,
                    )
                except AgentError:
                    log.exception("retention purge failed")

    def reload(self) -> None:
        """Re-read config, certificates, client CA and trusted keys; keep the old on error."""
        _notify("RELOADING=1")
        try:
            cfg = load_config(self.config_path)
            settings = settings_for(cfg)
            self.server.reload(cfg)
        except AgentError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc.message)
        else:
            self.cfg = cfg
            self.service.reload(settings)
            log.info("reloaded configuration from %s", self.config_path)
        _notify("READY=1")

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop_requested.set()

    def _on_reload(self, signum: int, frame: FrameType | None) -> None:
        self.reload_requested.set()


def run(config_path: Path) -> int:
    setup_logging()
    try:
        return Daemon(config_path).run()
    except AgentError as exc:
        log.error("cannot start: %s", exc.message)
        return 1
