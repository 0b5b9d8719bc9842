"""The one place where agent errors become gRPC status codes (PROTOCOL.md "Errors")."""

from __future__ import annotations

from typing import Any, NoReturn

import grpc

from agent.errors import AgentError, ErrorKind

CODES: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}


def code_for(exc: AgentError) -> grpc.StatusCode:
    return CODES[exc.kind]


async def abort(context: grpc.aio.ServicerContext[Any, Any], exc: AgentError) -> NoReturn:
    """End the call with the status of ``exc``; the message starts with its reason word."""
    await context.abort(code_for(exc), exc.message)
    raise AssertionError("context.abort returned")  # pragma: no cover
