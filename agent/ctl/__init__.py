"""``vicifast-agent ctl``: the control-plane engineer's CLI over the real client library.

Owns the ``ctl`` commands (allow, revoke, sync, erase, state, watch), how they find their
connection settings, their human and JSON output, and their exit codes. It builds, signs and
sends requests only through ``agent.rpc.client.AgentClient``; it must never speak TLS, sign, or
touch nftables itself.

Connection settings, first found wins: the command line (``--target`` ...), then environment
variables ``VICIFAST_CTL_<OPTION>`` (``VICIFAST_CTL_TARGET``, ``VICIFAST_CTL_SIGNING_KEY`` ...),
then a connection file (``--connection FILE`` or ``VICIFAST_CTL_CONNECTION``): TOML with the
options' names as keys (``target``, ``agent_id``, ``ca``, ``cert``, ``key``, ``signing_key``,
``keyid``, ``server_name``, ``timeout``), relative paths read from the file's directory.
``vicifast-agent dev-pki`` writes one (``ctl.toml``) next to its dev material.

Exit codes and errors follow the CLI's one contract (``agent.cli_contract``), as the sysadmin's
commands do: 0 done (per-entry outcomes such as STALE or NOT_FOUND are results, not failures);
2 usage or local problem (bad arguments, unreadable files); 3 the agent refused the request
(its reason word and gRPC code are printed); 4 the agent could not be reached or did not answer
in time, so the outcome of a change is unknown and the printed ``--request-id``/``--issued-at``
resend the identical, idempotent request; 130 interrupted.

Modules: ``connection`` (where the agent is and what this caller presents), ``entries`` (a
Sync's entries from JSON lines or CSV), ``output`` (human and JSON output), ``commands`` (the
commands and their arguments). This package module holds what they share: the exit codes and
the error type of problems on this side.
"""

from __future__ import annotations

from agent.cli_contract import Exit

__all__ = ["CtlError", "Exit"]


class CtlError(Exception):
    """A problem on this side (settings, files, input): reason word, detail, exit code."""

    def __init__(self, reason: str, detail: str, exit_code: Exit = Exit.USAGE) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.exit_code = exit_code
