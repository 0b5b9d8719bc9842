"""``vicifast-agent doctor``: each check says in plain words what is right or wrong and what to do.

Owns the checks and their verdict. The daemon runs all of them (it has CAP_NET_ADMIN and the
kernel view) when asked over the local socket; when the daemon cannot be reached the CLI runs
the ones that need only files (config, state directory, certificates, clock) itself. Checks
only read: they never repair, restart or edit anything.

Run without root while the daemon cannot be asked, doctor says so first ("privileges", a
warning) and marks each check it could not run "not checked" (info): never a traceback.

Exit code: 0 when every check is ok (``info`` lines do not count), 1 when the worst is a
warning (works now, needs attention: a certificate expiring within 14 days, a state directory
others can read, low disk space, a clock that went backwards, a table not yet back in sync), 2
when anything is a problem (something does not work: daemon unreachable, config that does not
parse, table missing, another table drops the protected ports, expired certificate, damaged
state database).
"""

from __future__ import annotations

import ctypes
import datetime as dt
import enum
import os
import sqlite3
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.cli_contract import Exit
from agent.config import AgentConfig, ApiConfig, load_config
from agent.errors import ConfigError
from agent.preflight import SERVICE_USER, ServiceUser, readiness_problems, service_user
from agent.rules.shadowing import Shadow

EXPIRY_WARNING = dt.timedelta(days=14)
MIN_YEAR = 2024
FUTURE_MTIME_TOLERANCE_S = 300
LOW_DISK_BYTES = 64 * 1024 * 1024
_TIME_ERROR = 5  # adjtimex(2): the clock is not synchronized


class Level(enum.Enum):
    OK = "ok"
    INFO = "info"
    WARNING = "warning"
    PROBLEM = "problem"


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    level: Level
    summary: str
    advice: str = ""

    def to_json(self) -> dict[str, str]:
        return {
            "name": self.name,
            "level": self.level.value,
            "summary": self.summary,
            "advice": self.advice,
        }

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> Check:
        return Check(str(d["name"]), Level(d["level"]), str(d["summary"]), str(d.get("advice", "")))


def exit_code(checks: Iterable[Check]) -> int:
    levels = {c.level for c in checks}
    # The CLI's one exit-code table (agent.cli_contract): 2 is a usage error, never a verdict.
    if Level.PROBLEM in levels:
        return Exit.PROBLEMS
    return Exit.NO if Level.WARNING in levels else Exit.OK


_MARK = {Level.OK: "ok", Level.INFO: "info", Level.WARNING: "WARN", Level.PROBLEM: "FAIL"}


def render(checks: Sequence[Check]) -> str:
    """Plain text, one block per check, then the verdict."""
    lines = []
    for c in checks:
        lines.append(f"[{_MARK[c.level]:>4}] {c.name}: {c.summary}")
        if c.advice:
            lines.append(f"       -> {c.advice}")
    verdict = {
        Exit.OK: "all good",
        Exit.NO: "works, with warnings",
        Exit.PROBLEMS: "PROBLEMS found",
    }[Exit(exit_code(checks))]
    lines.append(f"doctor: {verdict}")
    return "\n".join(lines)


# --- checks that need only files ---------------------------------------------------------------


def check_config_file(path: Path) -> tuple[Check, AgentConfig | None]:
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        return (
            Check(
                "config",
                Level.PROBLEM,
                f"{path} does not parse: {exc.detail}",
                f"fix the key {exc.key}; check with `vicifast-agent check-config {path}`; a "
                "running daemon keeps its old configuration until the file is valid",
            ),
            None,
        )
    return Check("config", Level.OK, f"{path} parses (agent_id {cfg.agent_id})"), cfg


def check_state_dir(directory: Path, *, owner: ServiceUser | None = None) -> list[Check]:
    """The state directory as the daemon needs it: owned by the user it runs as (``owner``,
    by default the unit's user: systemd's StateDirectory= makes it so), mode 0700."""
    owner = _daemon_user() if owner is None else owner
    try:
        st = directory.stat()
    except FileNotFoundError:
        return [
            Check(
                "state directory",
                Level.WARNING,
                f"{directory} does not exist",
                "the daemon creates it at start; if it is running, something removed it",
            )
        ]
    except PermissionError:
        return [_needs_root("state directory", directory)]
    except OSError as exc:
        return [Check("state directory", Level.PROBLEM, f"{directory}: {exc.strerror}")]
    if not stat.S_ISDIR(st.st_mode):
        return [Check("state directory", Level.PROBLEM, f"{directory} is not a directory")]
    checks = [_dir_permissions(directory, st, owner), _disk_space(directory)]
    checks.append(_database(directory / "state.db"))
    return checks


def _daemon_user() -> ServiceUser:
    """Whom the daemon runs as when it runs as the unit says: the unit's user if it exists on
    this host (whoever runs doctor), else root (a dev machine: the daemon needs root there)."""
    try:
        return service_user(SERVICE_USER)
    except ConfigError:
        return ServiceUser("root", 0, 0)


def _as_daemon() -> bool:
    """Whether this process sees files as the daemon does: root, or the daemon's own user."""
    return os.geteuid() == 0 or service_user().name == SERVICE_USER


def _needs_root(name: str, path: Path) -> Check:
    return Check(
        name,
        Level.INFO,
        f"not checked: {path} is not readable by uid {os.geteuid()}",
        "run doctor as root for this check",
    )


def _dir_permissions(directory: Path, st: os.stat_result, owner: ServiceUser) -> Check:
    mode = stat.S_IMODE(st.st_mode)
    if _as_daemon() and not os.access(directory, os.W_OK | os.X_OK):
        return Check(
            "state directory",
            Level.PROBLEM,
            f"{directory} is not writable",
            "the daemon cannot record changes; check ownership and the read-only mounts",
        )
    if mode & 0o077 or st.st_uid != owner.uid:
        return Check(
            "state directory",
            Level.WARNING,
            f"{directory} has mode {mode:04o}, owner uid {st.st_uid}; expected 0700, owned by "
            f"{owner.name} (uid {owner.uid}), the user the daemon runs as",
            f"it holds subjects and addresses: chown {owner.name}: {directory} && "
            f"chmod 0700 {directory}",
        )
    return Check("state directory", Level.OK, f"{directory} exists, mode 0700, owner {owner.name}")


def _disk_space(directory: Path) -> Check:
    vfs = os.statvfs(directory)
    free = vfs.f_bavail * vfs.f_frsize
    if free < LOW_DISK_BYTES:
        return Check(
            "disk space",
            Level.WARNING,
            f"{free // (1024 * 1024)} MiB free under {directory}",
            "with a full disk every request fails with UNAVAILABLE; free some space",
        )
    return Check("disk space", Level.OK, f"{free // (1024 * 1024)} MiB free under {directory}")


def _database(path: Path) -> Check:
    try:
        path.stat()
    except FileNotFoundError:
        return Check("state database", Level.INFO, f"{path} does not exist yet")
    except PermissionError:
        return _needs_root("state database", path)
    if not path.exists():
        return Check("state database", Level.INFO, f"{path} does not exist yet")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            findings = [str(r[0]) for r in conn.execute("PRAGMA quick_check(5)")]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        findings = [f"{type(exc).__name__}: {exc}"]
    if findings != ["ok"]:
        return Check(
            "state database",
            Level.PROBLEM,
            f"{path} is damaged: {'; '.join(findings)}",
            f"stop the agent, move {path} (and -wal, -shm) aside, start it again: it rebuilds "
            "its entries from the kernel's table and asks the control plane for a Sync",
        )
    return Check("state database", Level.OK, f"{path} passes SQLite's quick_check")


def _validity(label: str, cert: x509.Certificate, now: dt.datetime) -> Check:
    after, before = cert.not_valid_after_utc, cert.not_valid_before_utc
    subject = cert.subject.rfc4514_string() or "(no subject)"
    if now < before:
        return Check(
            label,
            Level.PROBLEM,
            f"{subject} is not valid before {before:%Y-%m-%d %H:%M} UTC",
            "the clock is wrong or the certificate was issued for the future",
        )
    if now >= after:
        return Check(
            label,
            Level.PROBLEM,
            f"{subject} expired on {after:%Y-%m-%d %H:%M} UTC",
            "install a renewed certificate and run `systemctl reload vicifast-agent`",
        )
    left = after - now
    if left <= EXPIRY_WARNING:
        return Check(
            label,
            Level.WARNING,
            f"{subject} expires in {left.days} days ({after:%Y-%m-%d} UTC)",
            "renew it soon, then `systemctl reload vicifast-agent`",
        )
    return Check(label, Level.OK, f"{subject} valid until {after:%Y-%m-%d} UTC")


def check_certificates(api: ApiConfig, now: dt.datetime) -> list[Check]:
    """The server certificate (and its key) and every certificate of the client CA bundle."""
    checks: list[Check] = []
    for label, path in (("server certificate", api.server_cert), ("client CA", api.client_ca)):
        try:
            certs = x509.load_pem_x509_certificates(path.read_bytes())
        except PermissionError:
            if os.geteuid() != 0:
                checks.append(_needs_root(label, path))
                continue
            checks.append(Check(label, Level.PROBLEM, f"cannot read {path}: permission denied"))
            continue
        except (OSError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not a PEM certificate"
            checks.append(Check(label, Level.PROBLEM, f"cannot read {path}: {why}"))
            continue
        if label == "server certificate":
            checks += [_validity(label, certs[0], now), _key_matches(api.server_key, certs[0])]
        else:
            checks += [_validity(label, c, now) for c in certs]
    return checks


def _key_matches(key_path: Path, cert: x509.Certificate) -> Check:
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except PermissionError as exc:
        if os.geteuid() != 0:
            return _needs_root("server key", key_path)
        return Check("server key", Level.PROBLEM, f"cannot read {key_path}: {exc.strerror}")
    except (OSError, ValueError, TypeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not an unencrypted PEM private key"
        return Check("server key", Level.PROBLEM, f"cannot read {key_path}: {why}")
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, pub) != cert.public_key().public_bytes(der, pub):
        return Check(
            "server key",
            Level.PROBLEM,
            f"{key_path} does not belong to the server certificate",
            "install the matching key and certificate together, then reload",
        )
    return Check("server key", Level.OK, f"{key_path} matches the server certificate")


def clock_synchronized() -> bool | None:
    """What the kernel says about NTP discipline (adjtimex), or None if it cannot be asked."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(512)  # struct timex, modes = 0: read only
        state = int(libc.adjtimex(buf))
    except (OSError, AttributeError):
        return None
    return None if state < 0 else state != _TIME_ERROR


def check_clock(
    now_s: float, *, reference_mtimes: Mapping[str, float], synchronized: bool | None
) -> Check:
    year = dt.datetime.fromtimestamp(now_s, dt.UTC).year
    if year < MIN_YEAR:
        return Check(
            "clock",
            Level.PROBLEM,
            f"the clock says {year}",
            "signed requests carry their time and will be refused; set the clock (NTP)",
        )
    ahead = {
        n: m - now_s for n, m in reference_mtimes.items() if m - now_s > FUTURE_MTIME_TOLERANCE_S
    }
    if ahead:
        name, by = max(ahead.items(), key=lambda kv: kv[1])
        return Check(
            "clock",
            Level.WARNING,
            f"{name} was modified {by:.0f} s in the future: the clock went backwards",
            "signed requests are checked against this clock; check NTP (timedatectl)",
        )
    if synchronized is False:
        return Check(
            "clock",
            Level.INFO,
            f"{dt.datetime.fromtimestamp(now_s, dt.UTC):%Y-%m-%d %H:%M:%S} UTC; the kernel "
            "reports no NTP synchronization",
            "requests are refused beyond the allowed skew (30 s by default); enable NTP",
        )
    return Check(
        "clock", Level.OK, f"{dt.datetime.fromtimestamp(now_s, dt.UTC):%Y-%m-%d %H:%M:%S} UTC"
    )


def offline_checks(config_path: Path, now_s: float) -> list[Check]:
    """What can be checked from files alone (the daemon is down or unreachable)."""
    config_check, cfg = check_config_file(config_path)
    checks = [config_check]
    if cfg is None:
        return checks
    checks += check_state_dir(cfg.state.directory)
    checks += check_certificates(cfg.api, dt.datetime.fromtimestamp(now_s, dt.UTC))
    checks += check_readiness(cfg)
    checks.append(
        check_clock(
            now_s, reference_mtimes=reference_mtimes(cfg), synchronized=clock_synchronized()
        )
    )
    return checks


def check_readiness(cfg: AgentConfig) -> list[Check]:
    """``check-config``'s refusals (placeholder agent_id, no trusted key, private keys others
    may read or a wrong user owns, files the daemon's user cannot read), one check each."""
    user = service_user()
    problems = readiness_problems(cfg, user, files=_as_daemon(), verify=False)
    files = {
        "api.server_cert": cfg.api.server_cert,
        "api.server_key": cfg.api.server_key,
        "api.client_ca": cfg.api.client_ca,
    }
    checks = [
        Check(
            "readiness",
            Level.PROBLEM,
            p.detail,
            "fix it, then run `vicifast-agent check-config` (it names the same problems)",
        )
        for p in problems
        # A file nobody can read is already a problem of the certificate checks above.
        if p.key not in files or os.access(files[p.key], os.R_OK)
    ]
    if not _as_daemon():
        checks.append(
            Check(
                "readiness",
                Level.INFO,
                f"not checked: whether {_daemon_user().name} may read the TLS files and keys",
                "run doctor as root for this check",
            )
        )
    if not checks:
        checks.append(Check("readiness", Level.OK, "ready to serve: agent_id, trusted keys, keys"))
    return checks


def privileges_check() -> Check | None:
    """Said first when doctor runs without root and the daemon could not run the checks."""
    if os.geteuid() == 0:
        return None
    return Check(
        "privileges",
        Level.WARNING,
        f"doctor runs as uid {os.geteuid()}, not root: checks of files only root or the "
        "daemon's user may read are marked 'not checked'",
        "run it as root: sudo vicifast-agent doctor",
    )


def reference_mtimes(cfg: AgentConfig) -> dict[str, float]:
    out = {}
    for path in (cfg.state.directory / "state.db", cfg.state.directory / "state.db-wal"):
        try:
            out[str(path)] = path.stat().st_mtime
        except OSError:
            continue
    return out


# --- checks over the kernel's view (run in the daemon) ----------------------------------------


def check_kernel(features: Mapping[str, Any] | None) -> Check:
    if features is None:
        return Check("kernel", Level.PROBLEM, "the kernel's features were not probed")
    refresh = (
        "re-adding an element refreshes its timeout"
        if features["readd_updates_timeout"]
        else "re-adding an element keeps its old timeout, so refreshes are delete+create"
    )
    delete = (
        "destroy" if features["destroy_supported"] else "delete (no `destroy` before 6.3/1.0.7)"
    )
    return Check(
        "kernel",
        Level.OK,
        f"kernel {features['kernel_release']}, nft {features['nft_version']}; {refresh}; "
        f"removals use {delete}",
    )


def check_table(table: str, present: bool, missing: Sequence[str]) -> Check:
    """Over ``agent.rules.structure``: ``missing`` is what the expected structure lacks."""
    name = f"inet {table}"
    if not present:
        return Check(
            "table",
            Level.PROBLEM,
            f"the agent's table {name} is missing: protected ports are not gated right now",
            "the daemon restores it on its own within seconds; if this persists, see its log "
            "(journalctl -u vicifast-agent)",
        )
    if missing:
        return Check(
            "table",
            Level.PROBLEM,
            f"{name} lacks or has changed: {', '.join(missing)}",
            "the daemon repairs its table on its own; if this persists, see its log",
        )
    return Check("table", Level.OK, f"{name} is present with every chain, set and rule")


def check_shadowing(found: Sequence[Shadow]) -> list[Check]:
    """Over ``agent.rules.shadowing``: each foreign chain dropping protected ports is a problem."""
    if not found:
        return [
            Check(
                "shadowing",
                Level.OK,
                "no other table's input chain drops the protected ports",
            )
        ]
    return [
        Check(
            "shadowing",
            Level.PROBLEM,
            f"{s.describe()}, even from sources the agent allows",
            "the agent only drops; the host firewall (firewalld, ufw, iptables, "
            "/etc/nftables.conf) must still open the protected ports. The agent never touches "
            "other tables",
        )
        for s in found
    ]


def daemon_unreachable(socket_path: Path, reason: str) -> Check:
    return Check(
        "daemon",
        Level.PROBLEM,
        f"not reachable on {socket_path}: {reason}",
        "is it running? `systemctl status vicifast-agent`; checks below come from files only",
    )
