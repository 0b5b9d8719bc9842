"""``ctl`` connection settings: the command line, then ``VICIFAST_CTL_<OPTION>`` variables,
then a connection file (TOML, the options' names as keys, relative paths read from the file's
directory); first found wins."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.ctl import CtlError
from agent.rpc.client import ClientIdentity
from agent.rpc.signing import keyid_for, private_key_from_pem

ENV_PREFIX = "VICIFAST_CTL_"
DEFAULT_TIMEOUT_S = 10.0
# Connection settings: name -> help. Each is --name-with-dashes, VICIFAST_CTL_NAME, file key.
CONNECTION_KEYS: dict[str, str] = {
    "target": "the agent's gRPC address, host:port",
    "agent_id": "the agent's configured agent_id (the signed requests' audience)",
    "ca": "PEM CA certificate that signed the agent's server certificate",
    "cert": "PEM mTLS client certificate of the control plane",
    "key": "PEM private key of that client certificate",
    "signing_key": "PEM Ed25519 request-signing key (allow, revoke, sync, erase)",
    "keyid": "key id the agent trusts the signing key under (default: derived from the key)",
    "server_name": "TLS name to verify the agent's certificate against (default: target host)",
    "timeout": f"seconds per call (default {DEFAULT_TIMEOUT_S:g})",
}
_PATH_KEYS = frozenset({"ca", "cert", "key", "signing_key"})
_REQUIRED = ("target", "agent_id", "ca", "cert", "key")


@dataclass(frozen=True, slots=True)
class Connection:
    """Where the agent is and what this caller presents to it."""

    target: str
    agent_id: str
    ca: Path
    cert: Path
    key: Path
    signing_key: Path | None = None
    keyid: str | None = None
    server_name: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise CtlError("bad_setting", "timeout must be a positive number of seconds")

    def identity(self, *, signing: bool) -> ClientIdentity:
        """Read the key material; ``signing`` requires the signing key."""
        if self.signing_key is None:
            if signing:
                raise CtlError("missing_setting", _missing_help("signing_key"))
            # Reads are authorised by mTLS alone; the client type still wants a key, which a
            # read never uses, so a throw-away one stands in.
            signer, keyid = Ed25519PrivateKey.generate(), ""
        else:
            try:
                signer = private_key_from_pem(_read(self.signing_key, "signing_key"))
            except ValueError as exc:
                raise CtlError("bad_signing_key", f"{self.signing_key}: {exc}") from exc
            keyid = self.keyid or keyid_for(signer.public_key())
        return ClientIdentity(
            ca_cert=_read(self.ca, "ca"),
            client_cert=_read(self.cert, "cert"),
            client_key=_read(self.key, "key"),
            signing_key=signer,
            keyid=keyid,
        )


def _read(path: Path, name: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CtlError("unreadable_file", f"{name} {path}: {exc.strerror or exc}") from exc


def _missing_help(name: str) -> str:
    return (
        f"{name} is not set: use --{name.replace('_', '-')}, {ENV_PREFIX}{name.upper()}"
        " or a connection file (--connection)"
    )


def _load_connection_file(path: Path) -> dict[str, str]:
    try:
        data = tomllib.loads(_read(path, "connection file").decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise CtlError("bad_connection_file", f"{path}: {exc}") from exc
    out: dict[str, str] = {}
    for name, raw in data.items():
        if name not in CONNECTION_KEYS:
            known = ", ".join(CONNECTION_KEYS)
            raise CtlError("bad_connection_file", f"{path}: unknown key {name!r} (known: {known})")
        number = isinstance(raw, int | float) and not isinstance(raw, bool)
        value = str(raw) if name == "timeout" and number else raw
        if not isinstance(value, str):
            raise CtlError("bad_connection_file", f"{path}: {name} must be a string")
        # A relative path is the file's neighbour; an absolute one stays as it is.
        out[name] = str(path.parent / value) if name in _PATH_KEYS and value else value
    return out


def resolve_connection(
    options: Mapping[str, str | None], env: Mapping[str, str], *, connection_file: str | None
) -> Connection:
    """Merge command line ``options``, then ``env``, then the connection file, into settings."""
    file_path = connection_file or env.get(f"{ENV_PREFIX}CONNECTION") or None
    from_file = _load_connection_file(Path(file_path)) if file_path else {}
    merged: dict[str, str] = {}
    for name in CONNECTION_KEYS:
        value = options.get(name) or env.get(f"{ENV_PREFIX}{name.upper()}") or from_file.get(name)
        if value:
            merged[name] = value
    for name in _REQUIRED:
        if name not in merged:
            raise CtlError("missing_setting", _missing_help(name))
    try:
        timeout = float(merged.get("timeout", DEFAULT_TIMEOUT_S))
    except ValueError as exc:
        raise CtlError("bad_setting", f"timeout {merged['timeout']!r} is not a number") from exc
    signing_key = merged.get("signing_key")
    return Connection(
        target=merged["target"],
        agent_id=merged["agent_id"],
        ca=Path(merged["ca"]),
        cert=Path(merged["cert"]),
        key=Path(merged["key"]),
        signing_key=Path(signing_key) if signing_key else None,
        keyid=merged.get("keyid"),
        server_name=merged.get("server_name"),
        timeout_s=timeout,
    )


def connection_file_text(settings: Mapping[str, str], *, comment: str = "") -> str:
    """A connection file for ``settings`` (keys from ``CONNECTION_KEYS``)."""
    lines = [f"# {line}" for line in comment.splitlines()]
    lines.append("# vicifast-agent ctl --connection THIS_FILE ...")
    for name, value in settings.items():
        if name not in CONNECTION_KEYS:
            raise ValueError(f"unknown connection setting {name!r}")
        lines.append(f"{name} = {json.dumps(value)}")  # a JSON string is a TOML basic string
    return "\n".join(lines) + "\n"
