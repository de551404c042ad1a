"""Where HTTP meets the server: every request is authenticated, admitted, read within its
limits, counted and answered here, under the same rules as gRPC's edge.

Probes (`/v2/health/*`) are never refused or charged. Every other request needs a bearer
token when auth is on, is admitted against the server's and its connection's caps
(RESOURCE_EXHAUSTED, HTTP 429), must send its body within `arrival_timeout_s` and at most
`max_message_bytes` of it (413), and is charged for it before it is read. A request
whose client closes the connection is cancelled where it stands, so one still queued
never reaches the model. Errors answer the protocol's `{"error": "..."}`.

Connections are watched (`ConnectionWatch`): one that has not begun a request within
`arrival_timeout_s` of opening is closed (headers trickled in, or nothing sent), and past
`max_connections` the connections idle longest are closed first, so held connections
cannot keep other clients out."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import orjson
from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.multipart import BodyPartReader
from aiohttp.web_protocol import RequestHandler

from service.core.admission import Admission, Kind
from service.edge.security import REFUSAL, BearerTokens
from service.frontends.http_inference import CALL
from service.observability.logs import Throttled
from service.status import ServingError, Status, bounded, invalid

log = logging.getLogger(__name__)
HTTP_STATUS = {
    Status.OK: 200, Status.CANCELLED: 499, Status.INVALID_ARGUMENT: 400,
    Status.DEADLINE_EXCEEDED: 504, Status.NOT_FOUND: 404, Status.ALREADY_EXISTS: 409,
    Status.RESOURCE_EXHAUSTED: 429, Status.FAILED_PRECONDITION: 400,
    Status.UNIMPLEMENTED: 501, Status.INTERNAL: 500, Status.UNAVAILABLE: 503,
    Status.UNAUTHENTICATED: 401}
_FROM_HTTP = {400: Status.INVALID_ARGUMENT, 404: Status.NOT_FOUND,
              405: Status.UNIMPLEMENTED, 413: Status.RESOURCE_EXHAUSTED}
PROBES = frozenset({"/v2/health/live", "/v2/health/ready"})
T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(doc: object, status: int) -> web.Response:
    return web.Response(body=orjson.dumps(doc), status=status, content_type="application/json")


def error(status: Status, message: str) -> web.Response:
    return json_response({"error": bounded(message)}, HTTP_STATUS[status])


class HttpEdge:
    def __init__(self, admission: Admission, tokens: BearerTokens | None,
                 arrival_timeout_s: float, compressed: bool, max_files: int,
                 max_connections: int, log_interval_s: float = 10.0) -> None:
        self.admission = admission
        self.tokens = tokens
        self.arrival_timeout_s = arrival_timeout_s
        self.compressed = compressed
        """Compressed bodies are expanded (bounded by max_message_bytes) only when set."""
        self.max_files = max_files
        self.watch = ConnectionWatch(arrival_timeout_s, max_connections)
        self._faults = Throttled(log, log_interval_s)
        self._refusals = Throttled(log, log_interval_s)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.watch.began(request)
        try:
            return await self._serve(request, handler)
        finally:
            self.watch.ended(request)

    async def _serve(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        probe = request.path in PROBES
        api, kind = ("probe", Kind.PROBE) if probe else ("http", Kind.WORK)
        if not probe and self.tokens is not None and not self.tokens.accepts(
                request.headers.get("Authorization")):
            self._refusals(logging.INFO, "refused an unauthenticated request to %s",
                           request.path[:200])
            self.admission.count("unknown", api, Status.UNAUTHENTICATED)
            return error(Status.UNAUTHENTICATED, REFUSAL)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        client = f"http:{peer[0]}:{peer[1]}" if peer else "http:unknown"
        try:
            with self.admission.admit(api, client, kind) as call:
                request[CALL] = call
                try:
                    return await handler(request)
                except web.HTTPException as exc:  # aiohttp's: unknown path, method, size
                    call.status = _FROM_HTTP.get(exc.status, Status.INVALID_ARGUMENT)
                    return json_response({"error": exc.reason}, exc.status)
        except ServingError as exc:
            return error(exc.status, str(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a server fault, answered and logged
            self._faults(logging.ERROR, "%s %s failed: %s", request.method, request.path[:200],
                         bounded(repr(exc), 200), exc_info=True)
            return error(Status.INTERNAL, f"internal error ({type(exc).__name__})")

    async def read_body(self, request: web.Request) -> bytes:
        """The body, charged to the call (twice: its bytes and their parse) before it is
        read when its length is declared; DEADLINE_EXCEEDED if it does not arrive in time."""
        encoding = request.headers.get("Content-Encoding", "identity").lower()
        if encoding not in ("identity", "") and not self.compressed:
            raise ServingError(Status.UNIMPLEMENTED,
                               f"compressed request bodies ({encoding[:20]}) are refused: a few "
                               "kilobytes can expand to the size limit (compressed_requests)")
        declared = self._charge_declared(request)
        body = await self._arriving(request.read())
        if declared is None:
            self._charge(request, len(body))
        return body

    async def read_files(self, request: web.Request) -> list[bytes]:
        """The non-empty files of a multipart body, read as they arrive under a body's
        limits (time, total size, charge) and at most `max_files` of them: a generic MIME
        parser over the whole body would hold the event loop for seconds on 100,000
        one-byte parts."""
        declared = self._charge_declared(request)
        try:
            files, total = await self._arriving(self._files(request))
        except (ValueError, HttpProcessingError) as exc:
            invalid(f"the multipart body could not be read: {bounded(str(exc), 200)}")
        if declared is None:
            self._charge(request, total)
        return files

    async def _files(self, request: web.Request) -> tuple[list[bytes], int]:
        limit = request.client_max_size
        files: list[bytes] = []
        total = 0
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                invalid("nested multipart bodies are not read")
            encoding = part.headers.get(hdrs.CONTENT_ENCODING, "identity").lower()
            transfer = part.headers.get(hdrs.CONTENT_TRANSFER_ENCODING, "binary").lower()
            if encoding != "identity" or transfer not in ("binary", "8bit", "7bit"):
                raise ServingError(Status.UNIMPLEMENTED, "encoded multipart files are refused: "
                                   "send each file's bytes as they are")
            if len(files) == self.max_files:
                invalid(f"at most {self.max_files} files per request")
            data = bytearray()
            while chunk := await part.read_chunk():
                total += len(chunk)
                if total > limit:
                    raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=total)
                data += chunk
            if data:
                files.append(bytes(data))
        return files, total

    async def _arriving(self, read: Awaitable[T]) -> T:
        """`read`, DEADLINE_EXCEEDED if the body has not arrived within arrival_timeout_s."""
        try:
            async with asyncio.timeout(self.arrival_timeout_s):
                return await read
        except TimeoutError:
            raise ServingError(Status.DEADLINE_EXCEEDED,
                               f"the request body did not arrive within "
                               f"{self.arrival_timeout_s:g}s") from None

    def _charge_declared(self, request: web.Request) -> int | None:
        """A declared body is charged (twice: its bytes and their parse) before it is read;
        413 at once when it is over the limit. Returns the declared length."""
        declared = request.content_length
        if declared is not None and declared > request.client_max_size:
            raise web.HTTPRequestEntityTooLarge(max_size=request.client_max_size,
                                                actual_size=declared)
        if declared is not None:
            self._charge(request, declared)
        return declared

    @staticmethod
    def _charge(request: web.Request, nbytes: int) -> None:
        request[CALL].charge(2 * nbytes, "the request body")


class ConnectionWatch:
    """What each connection of the HTTP port is doing, and the closing of those that hold a
    place without using it. aiohttp bounds neither connections nor the time to a first
    request, so this does, through its public API."""

    def __init__(self, first_request_s: float, max_connections: int = 1024) -> None:
        self.first_request_s = first_request_s
        self.max_connections = max_connections
        self._opened: dict[RequestHandler, float] = {}
        self._idle_since: dict[RequestHandler, float] = {}
        """Connections that have served a request, and when their last one ended (absent
        while one is in progress)."""
        self._busy: set[RequestHandler] = set()
        # Plain containers (aiohttp's handlers take no weak references), pruned each sweep.

    def began(self, request: web.Request) -> None:
        protocol = request.protocol
        self._busy.add(protocol)
        self._idle_since.pop(protocol, None)

    def ended(self, request: web.Request) -> None:
        protocol = request.protocol
        self._busy.discard(protocol)
        self._idle_since[protocol] = time.monotonic()

    def sweep(self, connections: list[RequestHandler]) -> int:
        """Close connections that never began a request in time, then, past the cap, the
        longest idle ones; returns how many were closed."""
        now = time.monotonic()
        current = set(connections)
        for gone in {*self._opened, *self._idle_since, *self._busy} - current:
            self._opened.pop(gone, None)
            self._idle_since.pop(gone, None)
            self._busy.discard(gone)
        closed = 0
        waiting = []
        for handler in connections:
            opened = self._opened.setdefault(handler, now)
            if handler in self._busy or handler in self._idle_since:
                continue
            if now - opened > self.first_request_s:
                handler.force_close()
                closed += 1
            else:
                waiting.append(handler)
        excess = len(connections) - closed - self.max_connections
        if excess > 0:
            idle = sorted((h for h in connections if h in self._idle_since),
                          key=self._idle_since.__getitem__)
            for handler in [*sorted(waiting, key=self._opened.__getitem__), *idle][:excess]:
                handler.force_close()
                closed += 1
        return closed

    async def run(self, server: web.Server, every_s: float = 0.5) -> None:
        while True:
            await asyncio.sleep(every_s)
            closed = self.sweep(server.connections)
            if closed:
                log.debug("closed %d HTTP connections holding a place unused", closed)
