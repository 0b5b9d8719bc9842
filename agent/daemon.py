"""Daemon lifecycle: wire the parts, converge, serve, notify systemd, reload, shut down.

Owns the process: signals (SIGTERM/SIGINT stop, SIGHUP reloads, both handled at once, not on a
poll), sd_notify READY/STATUS/WATCHDOG/RELOADING/STOPPING, the verification thread, routine
retention and the recovery from a corrupt store. It never flushes or deletes the table on the
way out: entries keep working while the daemon is stopped, restarting or being upgraded.

Start-up order: open the store (a corrupt one is moved aside and the entries are adopted from
the kernel's table), listen to nf_tables notifications, converge kernel and store (restart:
adopt the table; reboot: rebuild it with each entry's remaining timeout), start the writer and
the verifier, listen on the gRPC port, and only then READY=1.

WATCHDOG=1 is sent (when systemd asked for it with WATCHDOG_USEC) only while the engine's
writer loop keeps turning, so a stuck writer gets the daemon restarted.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import systemd.daemon  # Debian's python3-systemd
import systemd.journal

from agent.config import AgentConfig, load_config
from agent.engine import TICK_S, Engine
from agent.errors import AgentError
from agent.local.server import serve_local
from agent.metrics import SourceStatus, start_metrics
from agent.reconcile import UNCHANGED_STARTUP, Scope, adopt_kernel, converge_task, startup_scope
from agent.rpc.auth import CallerPolicy
from agent.rpc.server import AgentServer
from agent.rpc.service import FirewallAgentService, Health, Settings
from agent.rpc.signing import trust_policy_from_config
from agent.rules.monitor import NftMonitor, ruleset_fingerprint
from agent.rules.nft import NftAdapter, limit_heap_arenas
from agent.rules.shadowing import Shadow
from agent.rules.table import FirewallTable
from agent.state import HISTORY, Entry, Event, EventKind, Limits, StateView, numbered
from agent.state_records import to_stored, to_stored_event
from agent.store import Store, StoreCorrupt, StoreError
from agent.store_records import CommitBatch
from agent.verify import Verifier

log = logging.getLogger("vicifast-agent")
PURGE_EVERY_S = 300.0
STOP_GRACE_S = 10.0
HEAP_ARENAS = 2  # see agent.rules.nft.limit_heap_arenas
# Exit status for "the state directory cannot be used": the unit must not restart on it
# (RestartPreventExitStatus=), since a restart cannot fix a permission or I/O problem.
EXIT_STORE_UNUSABLE = 78
# The writer loop counts as alive if it turned within this many seconds (it turns every TICK_S
# when idle; a request group or a repair holds it for longer).
WRITER_STALE_S = 2 * TICK_S + 0.5
JOURNAL_FIELDS = ("REQUEST_ID", "CALLER", "RPC", "REASON")


def _notify(message: str) -> None:
    """sd_notify through libsystemd's binding; a no-op when not under systemd."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    systemd.daemon.notify(message)


def watchdog_interval_s() -> float | None:
    """Seconds systemd allows between WATCHDOG=1 pings, or None when it asked for none."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1_000_000


class _FieldsFormatter(logging.Formatter):
    """stderr format: the message, then the structured fields journald would get."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = [f"{k}={getattr(record, k)!r}" for k in JOURNAL_FIELDS if hasattr(record, k)]
        return f"{text} [{' '.join(fields)}]" if fields else text


def setup_logging() -> None:
    """journald with structured fields under systemd (JOURNAL_STREAM), stderr otherwise.

    Callers pass fields as ``extra={"REQUEST_ID": ..., "REASON": ...}``; the journal handler
    sends every upper-case record attribute as a journal field.
    """
    handler: logging.Handler
    if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"):
        handler = systemd.journal.JournalHandler(SYSLOG_IDENTIFIER="vicifast-agent")
        # The level and logger travel as journal fields (PRIORITY, LOGGER): the message alone,
        # not basicConfig's "INFO:vicifast-agent:" prefix in front of every line.
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_FieldsFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


def settings_for(cfg: AgentConfig) -> Settings:
    return Settings(cfg, trust_policy_from_config(cfg), CallerPolicy(cfg.api.allowed_identities))


@dataclass(frozen=True, slots=True)
class Status:
    """The one-line summary systemd shows (``systemctl status``)."""

    entries: int
    in_sync: bool
    resync_required: bool
    shadowed: bool
    repair_storm: bool = False

    def line(self) -> str:
        parts = [f"{self.entries} entries", "in sync" if self.in_sync else "NOT in sync"]
        if self.repair_storm:
            parts.append("UNHEALTHY: drift repairs keep coming (another agent on this table?)")
        if self.resync_required:
            parts.append("state rebuilt from the kernel, waiting for a Sync")
        if self.shadowed:
            parts.append("another table drops allowed traffic (see `vicifast-agent doctor`)")
        return ", ".join(parts)


class Daemon:
    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.cfg = load_config(config_path)
        self.stop_requested = threading.Event()
        self.reload_requested = threading.Event()
        self.wake = threading.Event()
        self.recovered_store: Path | None = None  # where a corrupt store was moved aside
        self._status: Status | None = None

    # --- what other parts read (metrics, GetState, the local socket, doctor) -----------------

    @property
    def drift_repairs(self) -> int:
        return self.verifier.drift_repairs

    @property
    def last_verified_at_ms(self) -> int:
        return self.verifier.last_verified_at_ms

    @property
    def resync_required(self) -> bool:
        """The store was rebuilt from the kernel and no Sync has been applied since."""
        return self.recovered_store is not None and self.engine.view.last_sync_issued_at_ms == 0

    @property
    def in_sync(self) -> bool:
        """The kernel's table was verified equal to the state, and the state is trustworthy; not
        while something keeps changing the table back (a repair storm)."""
        return self.verifier.in_sync and not self.resync_required and not self.verifier.repair_storm

    @property
    def shadowing(self) -> tuple[Shadow, ...]:
        return self.verifier.shadowing

    def snapshot(self) -> tuple[list[Entry], int]:
        """MetricsSource: entries the kernel enforces and the state version."""
        return self.engine.snapshot()

    def metrics_status(self) -> SourceStatus:
        """MetricsSource: the figures the metrics read at scrape time."""
        return SourceStatus(
            in_sync=self.in_sync,
            last_verified_at_ms=self.last_verified_at_ms,
            drift_repairs=self.drift_repairs,
            expiries=self.engine.expiries,
            shadowing=bool(self.shadowing),
            flows_cut=self.engine.flows_cut,
            flow_cut_failures=self.engine.flow_cut_failures,
            repair_storm=self.verifier.repair_storm,
        )

    def health(self) -> Health:
        return Health(
            in_sync=self.in_sync,
            last_verified_at_ms=self.last_verified_at_ms,
            drift_repairs=self.drift_repairs,
            recent_drift_repairs=self.verifier.recent_repairs,
            repair_storm=self.verifier.repair_storm,
        )

    # --- start --------------------------------------------------------------------------------

    def run(self) -> int:
        cfg = self.cfg
        cfg.state.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            self.store = self._open_store(cfg.state.directory / "state.db")
            # A store from before the ceiling existed (an upgrade) gets one now, not at its
            # first commit: a damage before that could not be recovered from above it.
            self.store.record_ceiling()
        except StoreError as exc:
            log.error(
                "cannot use the state database: %s", exc.message, extra={"REASON": exc.reason}
            )
            return EXIT_STORE_UNUSABLE
        # Listening before the first read-back, so no change made meanwhile goes unseen.
        self.monitor = NftMonitor(cfg.firewall.table)
        self.table = FirewallTable(cfg.firewall, NftAdapter(), quiet=self.monitor.not_listening)
        self.engine = self._make_engine(cfg)
        self.engine.load()
        if self.recovered_store is not None:
            self._adopt_kernel()
        conv = self.engine.run_task(
            converge_task(self.store, self.table, self.engine.now_ms, self._startup_scope())
        )
        features = self.table.probe()
        log.info(
            "kernel %s, nft %s, re-add refreshes timeout: %s, destroy: %s",
            features.kernel_release,
            features.nft_version,
            features.readd_updates_timeout,
            features.destroy_supported,
        )
        self.engine.start()
        self.verifier = Verifier(
            engine=self.engine,
            store=self.store,
            table=self.table,
            monitor=self.monitor,
            interval_s=cfg.verify.interval_s,
            elements_interval_s=cfg.verify.elements_interval_s,
            on_change=self.wake.set,
        )
        self.verifier.record(conv, startup=True)
        self.verifier.refresh_shadowing()
        self.verifier.start()
        self.service = FirewallAgentService(self.engine, settings_for(cfg), health=self.health)
        self.metrics = start_metrics(
            cfg, self, nft=self.table.nft, nft_version=features.nft_version
        )
        self.server = AgentServer(cfg, self.service, interceptors=[self.metrics.interceptor])
        self.server.start()
        self.local = serve_local(self)  # the on-host socket for the CLI (agent.local)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)
        log.info(
            "ready: %d entries, state_version %d, startup: %s, listening on %s",
            self.engine.entry_count,
            self.engine.view.state_version,
            conv.describe(),
            cfg.api.listen,
        )
        _notify(f"READY=1\nSTATUS={self._current_status().line()}")
        self._loop()
        self._shutdown()
        return 0

    def _make_engine(self, cfg: AgentConfig) -> Engine:
        skew_ms = cfg.signing.clock_skew_s * 1000
        return Engine(
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

    def _open_store(self, path: Path) -> Store:
        """Open the store; a corrupt one is moved aside (kept for inspection) and replaced."""
        try:
            return Store.open(path)
        except StoreCorrupt as exc:
            log.error("%s", exc.message, extra={"REASON": exc.reason})
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        for suffix in ("", "-wal", "-shm"):
            src = path.with_name(path.name + suffix)
            if src.exists():
                src.rename(aside.with_name(aside.name + suffix))
        self.recovered_store = aside
        log.error(
            "moved the damaged state database to %s; rebuilding the entries from the kernel's "
            "table and asking the control plane for a Sync (RESYNC_REQUIRED)",
            aside,
            extra={"REASON": "store_corrupt"},
        )
        store = Store.open(path)
        try:
            version = store.resume_after_loss(int(time.time() * 1000))
        except BaseException:
            store.close()
            raise
        log.warning(
            "state_version continues from %d; signed requests issued before now are refused "
            "(issued_before_recovery)",
            version,
            extra={"REASON": "store_corrupt"},
        )
        return store

    def _startup_scope(self) -> Scope:
        stopped_at = self.store.take_stop_generation()
        try:
            current: int | None = ruleset_fingerprint()
        except OSError as exc:
            log.warning("cannot read the ruleset generation: %s", exc)
            current = None
        scope = startup_scope(stopped_at, current, intents=bool(self.store.pending_intents()))
        if scope is UNCHANGED_STARTUP:
            log.info(
                "ruleset unchanged since the last clean stop: "
                "the elements are adopted without listing them",
            )
        return scope

    def _record_stop_generation(self) -> None:
        try:
            self.store.record_stop_generation(ruleset_fingerprint())
        except (OSError, AgentError) as exc:
            log.warning("cannot record the ruleset generation; the next start lists it: %s", exc)

    def _adopt_kernel(self) -> None:
        """Fill a fresh store from the kernel's table; tell watchers a Sync is needed."""
        now = self.engine.now_ms()
        entries = adopt_kernel(self.table, now)

        def task(view: StateView) -> tuple[StateView, list[Event], int]:
            final = view.detached()
            final.entries.update({e.key: e for e in entries})
            events = numbered(
                [
                    Event(
                        EventKind.RESYNC_REQUIRED,
                        now,
                        None,
                        f"state database was damaged; {len(entries)} entries adopted from the "
                        "kernel's table; send a Sync",
                    )
                ],
                view.state_version,
            )
            final.state_version = events[-1].state_version
            self.store.commit(_adoption_batch(final.state_version, entries, events))
            return final, events, len(entries)

        self.engine.run_task(task)

    # --- running ------------------------------------------------------------------------------

    def _current_status(self) -> Status:
        return Status(
            entries=self.engine.entry_count,
            in_sync=self.in_sync,
            resync_required=self.resync_required,
            shadowed=bool(self.shadowing),
            repair_storm=self.verifier.repair_storm,
        )

    def _loop(self) -> None:
        watchdog = watchdog_interval_s()
        tick = min(1.0, watchdog / 2) if watchdog else 1.0
        next_purge = time.monotonic()
        while not self.stop_requested.is_set():
            self.wake.wait(tick)
            self.wake.clear()
            if self.stop_requested.is_set():
                return
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                self.reload()
            # Fed only while the engine's writer loop keeps turning.
            if watchdog and time.monotonic() - self.engine.last_loop_at < WRITER_STALE_S:
                _notify("WATCHDOG=1")
            status = self._current_status()
            if status != self._status:
                self._status = status
                _notify(f"STATUS={status.line()}")
            if time.monotonic() >= next_purge:
                next_purge = time.monotonic() + PURGE_EVERY_S
                self._purge()

    def _purge(self) -> None:
        try:
            self.store.purge(
                self.engine.now_ms(),
                audit_retention_ms=self.cfg.state.audit_retention_days * 86_400_000,
                max_events=HISTORY,
            )
        except AgentError:
            log.exception("retention purge failed")

    def reload(self) -> None:
        """Re-read config, certificates, client CA and trusted keys; keep the old on error.

        The listener and calls in flight are untouched: new TLS handshakes use the new
        material, each call sees either the old or the new settings whole. Firewall and state
        settings (table, profiles, ports, directory) take effect at the next restart.
        """
        _notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            cfg = load_config(self.config_path)
            settings = settings_for(cfg)
            self.server.reload(cfg)
            self.metrics.reload(cfg)
        except AgentError as exc:
            log.error(
                "reload refused, keeping the running configuration: %s",
                exc.message,
                extra={"REASON": exc.reason},
            )
        else:
            if cfg.firewall != self.cfg.firewall or cfg.state != self.cfg.state:
                log.warning("firewall and state settings changed: they apply at the next restart")
            self.cfg = cfg
            self.service.reload(settings)
            self.verifier.interval_s = cfg.verify.interval_s
            self.verifier.elements_interval_s = cfg.verify.elements_interval_s
            log.info("reloaded configuration from %s", self.config_path)
        _notify("READY=1")

    def _shutdown(self) -> None:
        _notify("STOPPING=1")
        # New calls are refused from here on; calls in flight finish (within the grace).
        self.server.stop(grace=STOP_GRACE_S)
        self.local.stop()
        self.metrics.stop()
        self.verifier.stop()
        self.engine.stop()
        self._record_stop_generation()  # after the last kernel transaction of this process
        self.store.close()
        log.info("stopped; the table and its entries stay in place")

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop_requested.set()
        self.wake.set()

    def _on_reload(self, signum: int, frame: FrameType | None) -> None:
        self.reload_requested.set()
        self.wake.set()


def _adoption_batch(version: int, entries: list[Entry], events: list[Event]) -> CommitBatch:
    return CommitBatch(
        state_version=version,
        upserts=tuple(map(to_stored, entries)),
        events=tuple(map(to_stored_event, events)),
    )


def _reason(exc: AgentError) -> dict[str, str]:
    return {"REASON": exc.reason}


def run(config_path: Path) -> int:
    limit_heap_arenas(HEAP_ARENAS)
    setup_logging()
    try:
        code = Daemon(config_path).run()
    except AgentError as exc:
        log.error("cannot start: %s", exc.message, extra={"REASON": exc.reason})
        return 1
    # Everything is closed (store, sockets, threads joined). Tearing down the interpreter would
    # free 100,000 entries' objects one by one, a third of a second of a restart: exit at once.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
