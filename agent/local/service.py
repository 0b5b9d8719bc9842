"""The daemon's side of the local socket: status, list, allow, revoke, doctor, why, audit, reload.

Owns what an on-host caller may ask and how a local grant is made: the same field validation
as the gRPC API (``agent.rpc.convert`` over the same messages), the local policy (TTL cap,
``local-`` request ids) and the engine's single writer, so ordering, ``state_version`` and
events are shared with remote requests. It never edits the table itself and reads the kernel
only through cheap listings (``agent.local.kernel_view``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agent import __version__, doctor
from agent.config import AgentConfig, Profile
from agent.engine import Engine
from agent.errors import AgentError, InvalidArgument, Unavailable
from agent.local.access import (
    Peer,
    authorize_history,
    authorize_reload,
    local_request_id,
    local_ttl,
)
from agent.local.kernel_view import read_other_input_chains
from agent.local.wire import LocalRequest, arg_int, arg_str, arg_strings
from agent.outcome import Outcome
from agent.policy import normalize_address
from agent.preflight import current_user
from agent.rpc import convert
from agent.rpc.pb import agent_pb2
from agent.rpc.service import Health
from agent.rules.shadowing import Shadow, read_shadowing
from agent.rules.structure import Structure, expected_structure, read_structure
from agent.rules.table import FirewallTable
from agent.state import Entry, RequestMeta
from agent.why import (
    agent_verdict,
    entry_address,
    other_chains_verdicts,
    parse_packet,
    protected_by,
)

log = logging.getLogger("vicifast-agent.local")

# Audit rows in one answer: the newest this many unless asked, never more than the maximum
# (a week of a busy control plane is millions of rows; narrow by request, subject or address).
AUDIT_DEFAULT_ROWS = 50
AUDIT_MAX_ROWS = 1_000


def entry_json(e: Entry, now_ms: int) -> dict[str, Any]:
    return {
        "address": e.key.address.text,
        "profile": e.key.profile,
        "subject": e.subject,
        "created_at_ms": e.created_at_ms,
        "expires_at_ms": e.expires_at_ms,
        "expires_in_s": max(0, (e.expires_at_ms - now_ms) // 1000),
        "source": "local" if e.local else "remote",
        "request_id": e.request_id,
    }


def _outcome_json(o: Outcome) -> dict[str, Any]:
    return {
        "request_id": o.request_id,
        "state_version": o.state_version,
        "results": [
            {
                "address": r.address,
                "profile": r.profile,
                "status": r.status.name,
                "expires_at_ms": r.expires_at_ms,
                "reason": r.reason,
            }
            for r in o.results
        ],
    }


class LocalService:
    def __init__(
        self,
        engine: Engine,
        table: FirewallTable,
        *,
        config: Callable[[], AgentConfig],
        config_path: Path,
        health: Callable[[], Health] = Health,
        shadowing: Callable[[], Sequence[Shadow]] = tuple,
        clock: Callable[[], float] = time.time,
        reload: Callable[[], AgentError | None] | None = None,
        loops: Callable[[], dict[str, Any]] = lambda: {"stalled": [], "faults": {}},
    ) -> None:
        self.engine = engine
        self.loops = loops  # the supervised loops: stalled ones, faults per loop
        self.table = table
        self.config = config
        self.config_path = config_path
        self.health = health
        self.shadowing = shadowing
        self.clock = clock
        self.reload = reload
        self.started_at_ms = int(clock() * 1000)

    def handle(self, request: LocalRequest, peer: Peer) -> dict[str, Any]:
        handlers: dict[str, Callable[[dict[str, Any], Peer], dict[str, Any]]] = {
            "status": self._status,
            "list": self._list,
            "allow": self._allow,
            "revoke": self._revoke,
            "doctor": self._doctor,
            "why": self._why,
            "audit": self._audit,
            "reload": self._reload,
        }
        return handlers[request.op](request.args, peer)

    def _reload(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        """Reload the configuration and answer with the daemon's verdict (``systemctl
        reload``'s ExecReload waits for it): a refusal is the reason it was refused."""
        authorize_reload(peer)
        if self.reload is None:
            raise Unavailable("reload_unavailable", "this daemon cannot be reloaded from here")
        refused = self.reload()
        if refused is not None:
            raise refused
        return {"reloaded": True, "config": str(self.config_path)}

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    # --- reads -----------------------------------------------------------------------------------

    def _status(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        cfg = self.config()
        entries, version = self.engine.snapshot()
        h = self.health()
        by_profile: dict[str, int] = dict.fromkeys(cfg.profile_names, 0)
        for e in entries:
            by_profile[e.key.profile] = by_profile.get(e.key.profile, 0) + 1
        return {
            "agent_id": cfg.agent_id,
            "version": __version__,
            "pid": os.getpid(),
            "started_at_ms": self.started_at_ms,
            "now_ms": self._now_ms(),
            "state_version": version,
            "entries": len(entries),
            "local_entries": sum(1 for e in entries if e.local),
            "entries_by_profile": by_profile,
            "in_sync": h.in_sync,
            "last_verified_at_ms": h.last_verified_at_ms,
            "drift_repairs": h.drift_repairs,
            "loops": self.loops(),
            "drift_repairs_last_minute": h.recent_drift_repairs,
            "repair_storm": h.repair_storm,
            "shadowing": [_shadow_json(s) for s in self.shadowing()],
            "table": f"inet {cfg.firewall.table}",
            "listen": {
                "api": cfg.api.listen,
                "metrics": cfg.metrics.listen,
                "local": str(cfg.local.socket),
            },
            "local_ttl_cap_s": cfg.local.ttl_cap_s,
            # What a refused signature is checked against (the AuthFailuresSpiking runbook).
            "trusted_keys": [keyid for keyid, _ in cfg.signing.trusted_keys],
            "clock": {
                "now_ms": self._now_ms(),
                "ntp_synchronized": doctor.clock_synchronized(),
                "clock_skew_s": cfg.signing.clock_skew_s,
                "max_window_s": cfg.signing.max_window_s,
            },
        }

    def _list(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        profile, subject = arg_str(args, "profile"), arg_str(args, "subject")
        entries, version = self.engine.snapshot()
        now = self._now_ms()
        chosen = [
            entry_json(e, now)
            for e in sorted(entries, key=lambda e: e.key)
            if (not profile or e.key.profile == profile) and (not subject or e.subject == subject)
        ]
        return {"state_version": version, "now_ms": now, "entries": chosen}

    def _audit(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        """The newest audit rows matching a request id, subject and address: the journal names
        only request ids (no person), this is where a sysadmin reads what they did."""
        authorize_history(peer)
        limit = arg_int(args, "limit") or AUDIT_DEFAULT_ROWS
        if limit > AUDIT_MAX_ROWS:
            raise InvalidArgument("bad_request", f"'limit' must be at most {AUDIT_MAX_ROWS}")
        address = arg_str(args, "address")
        if address:  # as the audit wrote it (normal form, a /64 under that policy)
            address = normalize_address(address, self.config().address_policy).text
        rows = self.engine.store.audit_records(
            limit=limit,
            request_id=arg_str(args, "request_id"),
            subject=arg_str(args, "subject"),
            address=address,
        )
        return {"now_ms": self._now_ms(), "rows": [dataclasses.asdict(r) for r in rows]}

    def _doctor(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        cfg = self.config()
        now_s = self.clock()
        config_check, _ = doctor.check_config_file(self.config_path)
        checks = [
            doctor.Check("daemon", doctor.Level.OK, f"running, pid {os.getpid()}, {__version__}"),
            config_check,
        ]
        features = self.table.features
        checks.append(doctor.check_kernel(_features_json(features)))
        try:
            observed = read_structure(self.table.nft, cfg.firewall.table)
            missing = expected_structure(cfg.firewall).missing_from(observed)
            checks.append(doctor.check_table(cfg.firewall.table, _present(observed), missing))
            found = read_shadowing(
                self.table.nft,
                own_table=cfg.firewall.table,
                own_priority=cfg.firewall.chain_priority,
                protected=[port for p in cfg.firewall.profiles for port in p.ports],
            )
            checks += doctor.check_shadowing(found)
        except AgentError as exc:
            checks.append(
                doctor.Check("table", doctor.Level.PROBLEM, f"cannot list nftables: {exc.message}")
            )
        h = self.health()
        if not h.in_sync:
            checks.append(
                doctor.Check(
                    "sync",
                    doctor.Level.WARNING,
                    "the kernel's table does not match the agent's state right now",
                    "the daemon repairs drift on its own; see its log if this persists",
                )
            )
        checks.append(check_loops(self.loops()))
        if h.repair_storm:
            checks.append(
                doctor.Check(
                    "drift",
                    doctor.Level.PROBLEM,
                    f"{h.recent_drift_repairs} drift repairs in the last minute: something keeps "
                    "changing the agent's table back",
                    "look for a second vicifast-agent on this table (another state directory) "
                    "or a firewall reloading in a loop: journalctl REASON=drift_repaired",
                )
            )
        checks += doctor.check_state_dir(cfg.state.directory, owner=current_user())
        checks += doctor.check_certificates(cfg.api, dt.datetime.fromtimestamp(now_s, dt.UTC))
        checks += doctor.check_readiness(cfg)
        checks.append(
            doctor.check_clock(
                now_s,
                reference_mtimes=doctor.reference_mtimes(cfg),
                synchronized=doctor.clock_synchronized(),
            )
        )
        return {"checks": [c.to_json() for c in checks], "exit_code": doctor.exit_code(checks)}

    def _why(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        cfg = self.config()
        packet = parse_packet(arg_str(args, "address"), arg_str(args, "port"))
        assert packet.source is not None
        present = _present(read_structure(self.table.nft, cfg.firewall.table))
        target = protected_by(cfg.firewall, packet)
        in_set = False
        entry: dict[str, Any] | None = None
        if present and isinstance(target, Profile):
            key = entry_address(packet.source, cfg.firewall.ipv6_prefix)
            observed = self.table.read_elements([(target.name, packet.family)])
            in_set = any(k.address == key for k in observed)
            entries, _ = self.engine.snapshot()
            now = self._now_ms()
            entry = next(
                (
                    entry_json(e, now)
                    for e in entries
                    if e.key.address == key and e.key.profile == target.name
                ),
                None,
            )
        verdict = agent_verdict(cfg.firewall, packet, in_dynamic_set=in_set, table_present=present)
        view = read_other_input_chains(self.table.nft, cfg.firewall.table)
        others = other_chains_verdicts(view, packet)
        return {
            "packet": {
                "address": str(packet.source),
                "port": packet.port,
                "protocol": packet.protocol,
            },
            "agent": {
                "admission": verdict.admission.value,
                "admitted": verdict.admission.admitted,
                "profile": verdict.profile,
                "entry": verdict.entry,
                "explanation": verdict.explanation,
                "state_entry": entry,
            },
            "other_chains": [
                {
                    "chain": str(f.chain.ref),
                    "priority": f.chain.priority,
                    "policy": f.chain.policy,
                    "outcome": f.outcome.value,
                    "reason": f.reason,
                }
                for f in others
            ],
        }

    # --- changes ---------------------------------------------------------------------------------

    def _meta(self, rpc: str, args: dict[str, Any], peer: Peer) -> RequestMeta:
        cfg = self.config()
        now = self._now_ms()
        request_id = local_request_id()
        digest = hashlib.sha256(
            json.dumps([request_id, rpc, args], sort_keys=True).encode()
        ).digest()
        return RequestMeta(
            request_id=request_id,
            rpc=rpc,
            issued_at_ms=now,
            expires_at_ms=now + cfg.signing.max_window_s * 1000,
            payload_digest=digest,
            caller=peer.identity,
        )

    def _allow(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        cfg = self.config()
        addresses = arg_strings(args, "addresses")
        ttl = local_ttl(arg_int(args, "ttl"), cfg.ttl, cfg.local.ttl_cap_s)
        subject, profile = arg_str(args, "subject"), arg_str(args, "profile")
        msg = agent_pb2.AllowRequest(
            entries=[
                agent_pb2.AllowEntry(
                    address=a, ttl_seconds=ttl.seconds, subject=subject, profile=profile
                )
                for a in addresses
            ]
        )
        meta = self._meta("Allow", args, peer)
        outcome = self.engine.submit(convert.allow_command(msg, meta, cfg))
        _log_local("grant", outcome, peer)
        return {**_outcome_json(outcome), "ttl_s": ttl.seconds, "ttl_capped": ttl.capped}

    def _revoke(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        cfg = self.config()
        msg = agent_pb2.RevokeRequest(
            addresses=arg_strings(args, "addresses"),
            subject=arg_str(args, "subject"),
            profile=arg_str(args, "profile"),
        )
        meta = self._meta("Revoke", args, peer)
        outcome = self.engine.submit(convert.revoke_command(msg, meta, cfg))
        _log_local("revoke", outcome, peer)
        return _outcome_json(outcome)


def _log_local(what: str, outcome: Outcome, peer: Peer) -> None:
    """One journal line per local change, naming the request id, the profiles and the counts
    by status - never an address or a subject (the privacy policy: the journal is out of reach
    of retention and Erase). `vicifast-agent audit --request-id ID` shows who and what."""
    statuses = Counter(r.status.name.lower() for r in outcome.results)
    profiles = sorted({r.profile for r in outcome.results})
    log.info(
        "local %s %s in %s by %s: %s",
        what,
        outcome.request_id,
        ", ".join(profiles) or "-",
        peer.identity,
        ", ".join(f"{n} {status}" for status, n in sorted(statuses.items())) or "nothing",
        extra={
            "REQUEST_ID": outcome.request_id,
            "CALLER": peer.identity,
            "RPC": "Allow" if what == "grant" else "Revoke",
            "REASON": "local",
        },
    )


def _present(observed: Structure) -> bool:
    return bool(observed.chains or observed.sets)


def _shadow_json(s: Shadow) -> dict[str, Any]:
    return {
        "chain": f"{s.family} {s.table} {s.chain}",
        "priority": s.priority,
        "ports": list(s.ports),
        "why": s.why,
        "description": s.describe(),
    }


def _features_json(features: object) -> dict[str, Any] | None:
    if features is None:
        return None
    return {
        name: getattr(features, name)
        for name in ("kernel_release", "nft_version", "readd_updates_timeout", "destroy_supported")
    }


def check_loops(loops: dict[str, Any]) -> doctor.Check:
    """``doctor``'s verdict on the supervised loops (``agent.supervise``)."""
    stalled = list(loops.get("stalled") or ())
    faults = {name: n for name, n in (loops.get("faults") or {}).items() if n}
    if stalled:
        return doctor.Check(
            "loops",
            doctor.Level.PROBLEM,
            f"no progress within the deadline: {', '.join(stalled)}",
            "the watchdog is not fed, so systemd restarts the daemon unless the loop recovers; "
            "see `journalctl -u vicifast-agent REASON=loop_stalled`",
        )
    if faults:
        listed = ", ".join(f"{name} {n}" for name, n in sorted(faults.items()))
        return doctor.Check(
            "loops",
            doctor.Level.WARNING,
            f"every loop is turning; faults survived since start: {listed}",
            "see `journalctl -u vicifast-agent REASON=loop_fault` for the error and where it "
            "was raised",
        )
    return doctor.Check("loops", doctor.Level.OK, "every loop is turning, no faults since start")
