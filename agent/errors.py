"""The agent's error kinds: each carries a stable snake_case reason word.

Owns the vocabulary of failure. It never maps kinds to transport codes: the gRPC layer does that
in exactly one place (``agent.rpc.status``), so every other module raises one of these.
"""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    """What class of failure an error is; the transport maps each kind to one status code."""

    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission_denied"
    INVALID_ARGUMENT = "invalid_argument"
    ALREADY_EXISTS = "already_exists"
    FAILED_PRECONDITION = "failed_precondition"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class AgentError(Exception):
    """Base of every error the agent raises on purpose.

    ``reason`` is the stable word callers and tests match on; ``detail`` is free text for humans.
    """

    kind: ErrorKind = ErrorKind.INTERNAL

    def __init__(self, reason: str, detail: str = "") -> None:
        if not reason or not reason.replace("_", "").isalnum() or not reason.islower():
            raise ValueError(f"reason must be a snake_case word, got {reason!r}")
        self.reason = reason
        self.detail = detail
        super().__init__(self.message)

    @property
    def message(self) -> str:
        """The status message: the reason word, then ``: detail`` when there is one."""
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


class Unauthenticated(AgentError):
    kind = ErrorKind.UNAUTHENTICATED


class PermissionDenied(AgentError):
    kind = ErrorKind.PERMISSION_DENIED


class InvalidArgument(AgentError):
    kind = ErrorKind.INVALID_ARGUMENT


class AlreadyExists(AgentError):
    kind = ErrorKind.ALREADY_EXISTS


class FailedPrecondition(AgentError):
    kind = ErrorKind.FAILED_PRECONDITION


class ResourceExhausted(AgentError):
    kind = ErrorKind.RESOURCE_EXHAUSTED


class Unavailable(AgentError):
    kind = ErrorKind.UNAVAILABLE


class ConfigError(AgentError):
    """A configuration file that cannot be used; the message names the key and the fix."""

    kind = ErrorKind.INVALID_ARGUMENT

    def __init__(self, key: str, detail: str) -> None:
        self.key = key
        super().__init__("invalid_config", f"{key}: {detail}")


class KernelError(Unavailable):
    """libnftables refused a transaction; nothing was changed.

    ``errno`` is the kernel's error number (0 when libnftables failed before talking to the
    kernel, e.g. a parse error); callers branch on it, never on the message text.
    """

    def __init__(self, reason: str, errno: int, detail: str = "") -> None:
        self.errno = errno
        super().__init__(reason, detail)


class SetFull(ResourceExhausted):
    """A set reached its configured size (the kernel said ENFILE); nothing was changed."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("set_full", detail)
