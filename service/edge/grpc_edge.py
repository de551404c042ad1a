"""Where gRPC meets the server: every call is admitted, read, counted and answered here.

`EdgeInterceptor` wraps each method's handler, so that before any servicer runs:
- the call is admitted (service.core.admission): probes always, long-lived streams from a pool
  of their own, every other call against the server's and its connection's caps;
- its request message must arrive within `arrival_timeout_s` of its headers (checked by
  `sweep`, four times in that span: at most a quarter more), so a stream that sends
  headers and never a body holds nothing for long;
- the message is charged against the memory budget, then parsed here: bytes that are not
  the method's message are INVALID_ARGUMENT, logged once per interval, never a traceback;
and after it: a `ServingError` becomes the call's status, anything unexpected INTERNAL,
and the call is counted once, with the status its client saw (a client that cancels
after its answer was handed to gRPC is counted OK: gRPC Python does not report the
outcome of that last write).

Unary handlers are served as client streams of raw bytes: the wire is the same for a unary
client, and the edge holds the call from its headers on, not from its message.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError

from service.core.admission import Admission, Call, Kind
from service.observability.logs import Throttled
from service.status import ServingError, Status, bounded

log = logging.getLogger(__name__)
GRPC_CODES = {status: grpc.StatusCode[status.name] for status in Status}
_STATUSES = {code: status for status, code in GRPC_CODES.items()}

_CANCEL_TURN_S = 0.05
SWEEPS_PER_TIMEOUT = 4
"""Checks for requests that did not arrive, per `arrival_timeout_s`: a call waits at least
that long and at most a quarter more, and no call pays for a timer of its own."""
_OIP = "/inference.GRPCInferenceService/"
_HEALTH = "/grpc.health.v1.Health/"


@dataclass(frozen=True)
class Route:
    api: str
    """The metrics' `api` label."""
    kind: Kind


ROUTES: dict[str, Route] = {
    _OIP + "ModelInfer": Route("oip", Kind.WORK),
    _OIP + "ModelStreamInfer": Route("stream", Kind.STREAM),  # each request: "oip_stream"
    _OIP + "ModelMetadata": Route("metadata", Kind.WORK),
    _OIP + "ModelConfig": Route("metadata", Kind.WORK),
    _OIP + "ServerMetadata": Route("metadata", Kind.WORK),
    _OIP + "ModelStatistics": Route("statistics", Kind.WORK),
    _OIP + "RepositoryIndex": Route("repository", Kind.WORK),
    _OIP + "RepositoryModelLoad": Route("repository", Kind.WORK),
    _OIP + "RepositoryModelUnload": Route("repository", Kind.WORK),
    _OIP + "SystemSharedMemoryRegister": Route("shared_memory", Kind.WORK),
    _OIP + "SystemSharedMemoryStatus": Route("shared_memory", Kind.WORK),
    _OIP + "SystemSharedMemoryUnregister": Route("shared_memory", Kind.WORK),
    _OIP + "CudaSharedMemoryRegister": Route("shared_memory", Kind.WORK),
    _OIP + "CudaSharedMemoryStatus": Route("shared_memory", Kind.WORK),
    _OIP + "CudaSharedMemoryUnregister": Route("shared_memory", Kind.WORK),
    _OIP + "ServerLive": Route("probe", Kind.PROBE),
    _OIP + "ServerReady": Route("probe", Kind.PROBE),
    _OIP + "ModelReady": Route("probe", Kind.PROBE),
    _HEALTH + "Check": Route("probe", Kind.PROBE),
    _HEALTH + "Watch": Route("health_watch", Kind.STREAM),
    "/cnnserve.v1.Classifier/Predict": Route("classifier", Kind.WORK),
    "/cnnserve.v1.Classifier/ListModels": Route("metadata", Kind.WORK),
}
_STREAMS = Route("reflection", Kind.STREAM)
"""Any other method: reflection's bidirectional stream, which a client may hold open."""

Behaviour = Callable[[AsyncIterator[Any], grpc.aio.ServicerContext], Awaitable[Any]]


class EdgeInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, admission: Admission, arrival_timeout_s: float,
                 log_interval_s: float = 10.0) -> None:
        self.admission = admission
        self.arrival_timeout_s = arrival_timeout_s
        self._wrapped: dict[tuple[str, object], grpc.RpcMethodHandler] = {}
        self._client_errors = Throttled(log, log_interval_s)
        self.faults = Throttled(log, log_interval_s)

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler | None]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:  # gRPC answers UNIMPLEMENTED
            self.admission.count("unknown", "unknown", Status.UNIMPLEMENTED)
            return None
        method: str = details.method
        # Keyed by behaviour too: the auth interceptor may hand back its refusing handler.
        key = (method, _behaviour(handler))
        wrapped = self._wrapped.get(key)
        if wrapped is None:
            wrapped = self._wrapped[key] = self._wrap(method, handler)
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        route = ROUTES.get(method, _STREAMS)
        if handler.request_streaming:
            behaviour = self._streaming(route, handler)
            deserializer = handler.request_deserializer
        else:
            behaviour = self._unary(route, method, handler)
            deserializer = None  # raw bytes: parsed by the edge
        if not handler.response_streaming:  # one batch for the answer and its status
            return grpc.stream_unary_rpc_method_handler(
                behaviour, request_deserializer=deserializer,
                response_serializer=handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(
            behaviour, request_deserializer=deserializer,
            response_serializer=handler.response_serializer)

    def _unary(self, route: Route, method: str, handler: grpc.RpcMethodHandler) -> Behaviour:
        parse = handler.request_deserializer
        message = getattr(getattr(parse, "__self__", None), "__name__",
                          method.rsplit("/", 1)[-1] + " request")
        if handler.response_streaming:
            target: Callable[..., Any] = handler.unary_stream
        else:
            target = handler.unary_unary
        with_call = _takes_call(target)

        async def serve(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext,
                        call: Call) -> Any:
            raw = await self._receive(context, call)
            try:
                request = parse(raw)
            except Exception:  # noqa: BLE001 - any parse failure is the client's
                self._client_errors(logging.INFO, "refused %d bytes that are not a %s "
                                    "message", len(raw), message)
                raise ServingError(Status.INVALID_ARGUMENT,
                                   f"the request is not a valid {message} message "
                                   f"({len(raw)} bytes)") from None
            del raw
            args = (request, context, call) if with_call else (request, context)
            if not handler.response_streaming:
                return await target(*args)
            if inspect.isasyncgenfunction(target):
                async for response in target(*args):
                    await context.write(response)
            else:
                await target(*args)  # writes through context itself
            return None

        return self._admitted(route, serve, with_call)

    def _streaming(self, route: Route, handler: grpc.RpcMethodHandler) -> Behaviour:
        target = handler.stream_stream or handler.stream_unary
        with_call = _takes_call(target)
        if not inspect.isasyncgenfunction(target):
            # The handler's own coroutine, awaited by `behaviour` with no frame between:
            # a stream's every read and write resumes each frame of the chain.
            if with_call:
                return self._admitted(route, target, True)
            return self._admitted(
                route, lambda requests, context, call: target(requests, context), False)

        async def serve(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext,
                        call: Call) -> None:
            args = (requests, context, call) if with_call else (requests, context)
            async for response in target(*args):
                await context.write(response)

        return self._admitted(route, serve, with_call)

    def _admitted(self, route: Route,
                  serve: Callable[[AsyncIterator[Any], grpc.aio.ServicerContext, Call],
                                  Awaitable[Any]], ours: bool) -> Behaviour:
        """`serve` inside the call's admission; a ServingError becomes the call's status,
        anything unexpected INTERNAL (logged, throttled). `ours`: the project's servicers,
        which answer errors by raising, never by setting a code and returning."""
        admission = self.admission

        async def behaviour(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
                            ) -> Any:
            try:
                with admission.admit(route.api, context.peer(), route.kind) as call:
                    try:
                        answer = await serve(requests, context, call)
                    except grpc.aio.AbortError:
                        call.status = _status_set(context)
                        raise
                    except DecodeError:  # gRPC parses a stream's messages as they are read
                        raise ServingError(Status.INVALID_ARGUMENT,
                                           "a request message on this stream is not valid "
                                           "protobuf") from None
                    if not ours:
                        call.status = _status_set(context)
                    return answer
            except ServingError as exc:
                refusal = (exc.status, str(exc))
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as exc:  # noqa: BLE001 - a server fault, answered and logged
                self.faults(logging.ERROR, "%s failed on %s", route.api,
                            bounded(repr(exc), 200), exc_info=True)
                refusal = (Status.INTERNAL, f"internal error ({type(exc).__name__})")
            await abort(context, *refusal)  # outside the except blocks: nothing chained

        return behaviour

    async def sweep(self) -> None:
        """End calls whose request message has not arrived in time, until cancelled."""
        while True:
            await asyncio.sleep(self.arrival_timeout_s / SWEEPS_PER_TIMEOUT)
            self.admission.expire_waiting(SWEEPS_PER_TIMEOUT + 1, self.arrival_timeout_s)

    async def _receive(self, context: grpc.aio.ServicerContext, call: Call) -> bytes:
        task = asyncio.current_task()
        assert task is not None
        call.wait_for_request(task)
        try:
            raw = await context.read()
        except asyncio.CancelledError:
            if call.refusal is None:  # the client went away
                raise
            task.uncancel()
            raise call.refusal from None
        call.request_arrived()
        if not isinstance(raw, bytes):
            # No message: the client went away (gRPC cancels this task on its next turns),
            # or it half-closed without sending one.
            await asyncio.sleep(_CANCEL_TURN_S)
            raise ServingError(Status.INVALID_ARGUMENT, "the call carried no request message")
        call.charge(2 * len(raw), "the request message")  # its bytes and their parse
        return raw


async def abort(context: grpc.aio.ServicerContext, status: Status, message: str) -> NoReturn:
    """`context.abort`, leaving no garbage cycle behind.

    gRPC keeps the AbortError on the call's state, and the error's traceback holds the
    handler's frames, which hold the context, which holds the state: every aborted call
    would wait for a full garbage collection, and under a flood of refusals those hold
    the GIL for long pauses. Once the call is over the traceback is dropped.
    """
    try:
        await context.abort(GRPC_CODES[status], message)
    except grpc.aio.AbortError as exc:
        asyncio.get_running_loop().call_soon(_forget_frames, exc)
        raise
    raise AssertionError("context.abort returned")


def _forget_frames(exc: BaseException) -> None:
    exc.__traceback__ = None
    exc.__context__ = None


def _status_set(context: grpc.aio.ServicerContext) -> Status:
    """The status a handler set with `set_code` or `abort`, OK if none."""
    code = context.code()
    return Status.OK if code is None else _STATUSES.get(code, Status.INTERNAL)


def _behaviour(handler: grpc.RpcMethodHandler) -> object:
    return (handler.unary_unary or handler.unary_stream or handler.stream_unary
            or handler.stream_stream)


def _takes_call(target: Callable[..., Any]) -> bool:
    """This project's servicers take the admitted call as a third argument; library
    servicers (health, reflection) and the token check's refusal take two."""
    try:
        return len(inspect.signature(target).parameters) == 3
    except (TypeError, ValueError):  # a builtin without a signature
        return False
