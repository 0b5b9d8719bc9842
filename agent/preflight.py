"""What must hold before the daemon first touches the kernel, and before a reload swaps anything in.

Owns the checks of the material the daemon serves with: the server certificate chain and its
private key parse and belong together, every certificate of the client CA bundle parses, the
trusted signing keys decode (``verify_tls``); the lock that makes a state directory one daemon's
(``StateLock``); and what ``check-config`` and ``doctor`` add for the operator: private key
files that others could read or write, or that a wrong user owns (``key_file_problems``), and
files the service user cannot read (``unreadable_as``).

It never touches nftables or the store: a check that fails here leaves the host's ruleset
exactly as it was. Errors are ``ConfigError`` naming the configuration key and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import json
import os
import pwd
import socket
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.config import AgentConfig
from agent.errors import AgentError, ConfigError, ErrorKind

# The unit's User= (systemd/vicifast-agent.service). check-config run by root checks file
# access as this user when it exists on the host.
SERVICE_USER = "vicifast-agent"
LOCK_NAME = "lock"


def verify_tls(cert_chain: bytes, private_key: bytes, client_ca: bytes) -> None:
    """The server's certificate chain and key parse and match; the client CA bundle parses.

    ``ConfigError`` names ``api.server_cert``, ``api.server_key`` or ``api.client_ca``.
    """
    try:
        certs = x509.load_pem_x509_certificates(cert_chain)
    except ValueError as exc:
        raise ConfigError(
            "api.server_cert", "not a PEM certificate (chain); install the agent's certificate"
        ) from exc
    try:
        key = serialization.load_pem_private_key(private_key, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            "api.server_key",
            "not an unencrypted PEM private key (truncated, encrypted or another format); "
            "install the key that belongs to api.server_cert",
        ) from exc
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(der, spki) != certs[0].public_key().public_bytes(der, spki):
        raise ConfigError(
            "api.server_key",
            "does not belong to the certificate in api.server_cert; install the matching key "
            "and certificate together",
        )
    try:
        x509.load_pem_x509_certificates(client_ca)
    except ValueError as exc:
        raise ConfigError(
            "api.client_ca",
            "not a PEM certificate bundle; install the CA that signs the control plane's "
            "client certificates",
        ) from exc


class StateDirLocked(AgentError):
    """Another daemon holds the state directory's lock."""

    kind = ErrorKind.FAILED_PRECONDITION


class StateDirUnusable(AgentError):
    """The state directory (or its lock file) cannot be created or opened."""

    kind = ErrorKind.UNAVAILABLE


@dataclass
class StateLock:
    """An exclusive ``flock`` on ``<state directory>/lock``, held for the process's lifetime.

    One daemon per state directory: two daemons over one store would each take the other's
    entries for drift. The kernel drops the lock when the process ends, however it ends, so a
    crash never leaves a stale lock behind. The file holds the holder's pid, for the message.
    """

    path: Path
    fd: int

    @staticmethod
    def take(directory: Path) -> StateLock:
        path = directory / LOCK_NAME
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StateDirUnusable(
                "state_dir_unusable", f"cannot open {path}: {exc.strerror}"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StateDirUnusable(
                    "state_dir_unusable", f"cannot lock {path}: {exc.strerror}"
                ) from exc
            who = f"pid {holder}" if holder else "another process"
            raise StateDirLocked(
                "already_running",
                f"another vicifast-agent ({who}) already uses the state directory {directory}; "
                "one daemon per state directory and table: stop it first "
                "(systemctl stop vicifast-agent), or give this one its own [state] directory "
                "and [firewall] table",
            ) from exc
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return StateLock(path, fd)

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


# --- what check-config and doctor add ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServiceUser:
    """Whom the daemon runs as: file access is checked as this user."""

    name: str
    uid: int
    gid: int
    note: str = ""  # why this user was chosen, when it is not the obvious one


def service_user(requested: str | None = None) -> ServiceUser:
    """``requested`` if given (``ConfigError`` if unknown); otherwise the unit's user when root
    runs the check and the user exists, else whoever runs it (a dev machine, a test)."""
    if requested:
        try:
            pw = pwd.getpwnam(requested)
        except KeyError as exc:
            raise ConfigError(
                "--user", f"no user {requested!r} on this host; name the daemon's user"
            ) from exc
        return ServiceUser(pw.pw_name, pw.pw_uid, pw.pw_gid)
    euid = os.geteuid()
    if euid == 0:
        try:
            pw = pwd.getpwnam(SERVICE_USER)
        except KeyError:
            return ServiceUser(
                "root",
                0,
                0,
                note=f"no user {SERVICE_USER} on this host (package not installed?): "
                "files checked as root",
            )
        return ServiceUser(pw.pw_name, pw.pw_uid, pw.pw_gid)
    try:
        name = pwd.getpwuid(euid).pw_name
    except KeyError:
        name = str(euid)
    note = ""
    if name != SERVICE_USER:
        note = f"run by {name}, not root: files checked as {name}; as root they are checked as "
        note += f"the daemon's user ({SERVICE_USER})"
    return ServiceUser(name, euid, os.getegid(), note=note)


def current_user() -> ServiceUser:
    """The user this process runs as (the daemon: whom it really runs as)."""
    euid = os.geteuid()
    try:
        name = pwd.getpwuid(euid).pw_name
    except KeyError:
        name = str(euid)
    return ServiceUser(name, euid, os.getegid())


def key_file_problems(key: str, path: Path, user: ServiceUser) -> list[ConfigError]:
    """A private key file others may read or write, or owned by neither root nor ``user``.

    Accepted: owner ``user`` or root; no access for others; the group may at most read, and
    only ``user``'s own group (the README's ``root:vicifast-agent`` mode 0640) or root's.
    """
    try:
        st = path.stat()
    except OSError:
        return []  # unreadable or missing: the readability check names it
    mode = stat.S_IMODE(st.st_mode)
    found = []
    if st.st_uid not in (0, user.uid):
        found.append(
            ConfigError(
                key,
                f"{path} is owned by uid {st.st_uid}, neither root nor {user.name}; "
                f"chown root:{_group_name(user.gid)} {path}",
            )
        )
    if mode & 0o007 or mode & 0o020 or (mode & 0o040 and st.st_gid not in (0, user.gid)):
        found.append(
            ConfigError(
                key,
                f"{path} has mode {mode:04o} (group {_group_name(st.st_gid)}): a private key "
                f"must not be readable or writable by others; chmod 0640 {path} with group "
                f"{_group_name(user.gid)}, or 0600 owned by {user.name}",
            )
        )
    return found


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


_PROBE = (
    "import json, sys\n"
    "out = {}\n"
    "for p in sys.argv[1:]:\n"
    "    try:\n"
    "        open(p, 'rb').close()\n"
    "        out[p] = ''\n"
    "    except OSError as e:\n"
    "        out[p] = e.strerror or type(e).__name__\n"
    "print(json.dumps(out))\n"
)


def unreadable_as(user: ServiceUser, paths: list[Path]) -> dict[Path, str]:
    """Which of ``paths`` ``user`` cannot open for reading, and why (strerror).

    As the caller when that is ``user``; otherwise (root checking for the service user) in a
    child process with the user's uid, gid and supplementary groups, so modes, ACLs and the
    directories on the way all count exactly as they will for the daemon.
    """
    if user.uid == os.geteuid():
        out = {}
        for p in paths:
            try:
                p.open("rb").close()
            except OSError as exc:
                out[p] = exc.strerror or type(exc).__name__
        return out
    if os.geteuid() != 0:
        return {p: f"cannot check as {user.name} without root" for p in paths}
    groups = os.getgrouplist(user.name, user.gid)
    try:
        done = subprocess.run(
            [os.path.realpath(sys.executable), "-I", "-c", _PROBE, *map(str, paths)],
            user=user.uid,
            group=user.gid,
            extra_groups=groups,
            capture_output=True,
            text=True,
            check=False,
            cwd="/",
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return {p: f"cannot check as {user.name}: {exc}" for p in paths}
    if done.returncode != 0:
        return {p: f"cannot check as {user.name}: {done.stderr.strip()[-200:]}" for p in paths}
    answers: dict[str, str] = json.loads(done.stdout)
    return {Path(p): why for p, why in answers.items() if why}


# The shipped example's agent_id (packaging/agent.toml): no control plane names a real server so.
PLACEHOLDER_AGENT_ID = "dialer-01.example.com"
EXAMPLE_KEYID = "ed25519:519493acbc3adb7b"  # packaging/agent.toml's commented example
EXAMPLE_PUBLIC_KEY = "6WmnEt2anqY1en52KAsvow3M/XktoiYoF6Vd8hrYsvs="


def readiness_problems(
    cfg: AgentConfig, user: ServiceUser, *, files: bool = True, verify: bool = True
) -> list[ConfigError]:
    """What stops a valid configuration from serving a control plane, as ``user`` would run it.

    ``check-config`` refuses on any of these; ``doctor`` reports them. The daemon itself checks
    the material it reads (``verify_tls``) but not the identity choices below: a dev or test
    configuration may run without them.
    """
    found: list[ConfigError] = []
    if cfg.agent_id == PLACEHOLDER_AGENT_ID:
        found.append(
            ConfigError(
                "agent_id",
                f"still the example's {PLACEHOLDER_AGENT_ID!r}; set this server's own id, the "
                "one the control plane signs its requests for",
            )
        )
    for keyid, public in cfg.signing.trusted_keys:
        if keyid == EXAMPLE_KEYID or public == EXAMPLE_PUBLIC_KEY:
            found.append(
                ConfigError(
                    f'signing.trusted_keys."{keyid}"',
                    "the example's key, which nobody holds; put your control plane's key id "
                    "and public key in its place",
                )
            )
    if not cfg.signing.trusted_keys:
        found.append(
            ConfigError(
                "signing.trusted_keys",
                "no trusted key: no signed request could ever be accepted; add the control "
                'plane\'s key under [signing.trusted_keys] as "KEYID" = "BASE64-PUBLIC-KEY"',
            )
        )
    if files:
        found += _file_problems(cfg, user, verify=verify)
    return found


def _file_problems(cfg: AgentConfig, user: ServiceUser, *, verify: bool) -> list[ConfigError]:
    found: list[ConfigError] = []
    tls_files = [
        ("api.server_cert", cfg.api.server_cert),
        ("api.server_key", cfg.api.server_key),
        ("api.client_ca", cfg.api.client_ca),
    ]
    if cfg.metrics.tls_cert is not None and cfg.metrics.tls_key is not None:
        tls_files += [
            ("metrics.tls_cert", cfg.metrics.tls_cert),
            ("metrics.tls_key", cfg.metrics.tls_key),
        ]
    unreadable = unreadable_as(user, [path for _, path in tls_files])
    for key, path in tls_files:
        if path in unreadable:
            found.append(
                ConfigError(
                    key,
                    f"{path}: {unreadable[path]} for user {user.name}, whom the daemon runs as; "
                    "fix the path, the file's owner/group or mode, or its directory's",
                )
            )
    for key, path in tls_files:
        if key.endswith("_key"):
            found += key_file_problems(key, path, user)
    if not verify:
        return found
    if not any(p.key.startswith("api.") for p in found):
        try:
            verify_tls(*(path.read_bytes() for _, path in tls_files[:3]))
        except ConfigError as exc:
            found.append(exc)
        except OSError:
            pass  # readable by the service user but not by whoever checks: nothing to add
    if len(tls_files) > 3 and not any(p.key.startswith("metrics.") for p in found):
        from agent.metrics.http import TlsFiles  # noqa: PLC0415  # prometheus only if needed

        try:
            TlsFiles(tls_files[3][1], tls_files[4][1]).context()
        except ConfigError as exc:
            found.append(exc)
    return found


def check_listen_free(key: str, listen: str) -> None:
    """``ConfigError`` naming ``key`` if another socket already listens on ``listen``.

    A trial bind, closed at once (SO_REUSEADDR, as the listeners themselves bind): a port taken
    by another program is found before the kernel is touched instead of after the table exists.
    A name that does not resolve is left to the listener itself, which reports it.
    """
    host, _, port = listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (OSError, ValueError, IndexError):
        return
    with socket.socket(family, kind, proto) as trial:
        trial.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            trial.bind(address)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                return  # e.g. an address not on this host yet: the listener reports it
            raise ConfigError(
                key,
                f"{listen} is already in use (another vicifast-agent, or another program); "
                "stop it or pick another port",
            ) from exc
