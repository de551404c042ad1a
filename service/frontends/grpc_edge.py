"""Where a gRPC servicer meets the core: a `ServingError` becomes the call's status."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from service.core import ServingError, Status

GRPC_CODES = {status: grpc.StatusCode[status.name] for status in Status}

S = TypeVar("S")
Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[S, Req, grpc.aio.ServicerContext], Awaitable[Resp]]


def grpc_status(handler: Handler[S, Req, Resp]) -> Handler[S, Req, Resp]:
    """Decorate a servicer method: refusals answer with their status and message."""

    @functools.wraps(handler)
    async def wrapped(self: S, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        try:
            return await handler(self, request, context)
        except ServingError as exc:
            await context.abort(GRPC_CODES[exc.status], str(exc))
            raise  # unreachable: abort raises

    return wrapped
