"""Where HTTP meets the server: every request is authenticated, admitted, read within its
limits, counted and answered here, under the same rules as gRPC's edge.

Probes (`/v2/health/*`) are never refused or charged. Every other request needs a bearer
token when auth is on, is admitted against the server's and its connection's caps
(RESOURCE_EXHAUSTED, HTTP 429), must send its body within `arrival_timeout_s` and at most
`max_message_bytes` of it (413), and is charged for it before it is read. A request
whose client closes the connection is cancelled where it stands, so one still queued
never reaches the model. Errors answer the protocol's `{"error": "..."}`.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from service.admission import CURRENT_CALL, Admission, Kind
from service.frontends.http_inference import Handler, json_response
from service.logs import Throttled
from service.metrics import Metrics
from service.security import REFUSAL, BearerTokens
from service.status import ServingError, Status, bounded

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


def error(status: Status, message: str) -> web.Response:
    return json_response({"error": bounded(message)}, HTTP_STATUS[status])


class HttpEdge:
    def __init__(self, admission: Admission, metrics: Metrics, tokens: BearerTokens | None,
                 arrival_timeout_s: float, compressed: bool,
                 log_interval_s: float = 10.0) -> None:
        self.admission = admission
        self.metrics = metrics
        self.tokens = tokens
        self.arrival_timeout_s = arrival_timeout_s
        self.compressed = compressed
        """Compressed bodies are expanded (bounded by max_message_bytes) only when set."""
        self._faults = Throttled(log, log_interval_s)
        self._refusals = Throttled(log, log_interval_s)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        probe = request.path in PROBES
        api, kind = ("probe", Kind.PROBE) if probe else ("http", Kind.WORK)
        if not probe and self.tokens is not None and not self.tokens.accepts(
                request.headers.get("Authorization")):
            self._refusals(logging.INFO, "refused an unauthenticated request to %s",
                           request.path[:200])
            self._count("unknown", api, Status.UNAUTHENTICATED)
            return error(Status.UNAUTHENTICATED, REFUSAL)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        client = f"http:{peer[0]}:{peer[1]}" if peer else "http:unknown"
        try:
            call = self.admission.open(api, client, kind)
        except ServingError as exc:
            self._count("unknown", api, exc.status)
            return error(exc.status, str(exc))
        token = CURRENT_CALL.set(call)
        status = Status.OK
        try:
            return await handler(request)
        except ServingError as exc:
            status = exc.status
            return error(status, str(exc))
        except web.HTTPException as exc:  # aiohttp's own: unknown path, method, body size
            status = _FROM_HTTP.get(exc.status, Status.INVALID_ARGUMENT)
            return json_response({"error": exc.reason}, exc.status)
        except asyncio.CancelledError:
            status = Status.CANCELLED
            raise
        except Exception as exc:  # noqa: BLE001 - a server fault, answered and logged
            status = Status.INTERNAL
            self._faults(logging.ERROR, "%s %s failed: %s", request.method, request.path[:200],
                         bounded(repr(exc), 200), exc_info=True)
            return error(status, f"internal error ({type(exc).__name__})")
        finally:
            CURRENT_CALL.reset(token)
            self.admission.close(call)
            self._count(call.model, api, status)

    async def read_body(self, request: web.Request) -> bytes:
        """The body, charged to the call (twice: its bytes and their parse) before it is
        read when its length is declared; DEADLINE_EXCEEDED if it does not arrive in time."""
        encoding = request.headers.get("Content-Encoding", "identity").lower()
        if encoding not in ("identity", "") and not self.compressed:
            raise ServingError(Status.UNIMPLEMENTED,
                               f"compressed request bodies ({encoding[:20]}) are refused: a few "
                               "kilobytes can expand to the size limit (compressed_requests)")
        call = CURRENT_CALL.get()
        declared = request.content_length
        if call is not None and declared is not None:
            call.charge(2 * declared, "the request body")
        try:
            async with asyncio.timeout(self.arrival_timeout_s):
                body = await request.read()
        except TimeoutError:
            raise ServingError(Status.DEADLINE_EXCEEDED,
                               f"the request body did not arrive within "
                               f"{self.arrival_timeout_s:g}s") from None
        if call is not None and declared is None:
            call.charge(2 * len(body), "the request body")
        return body

    def _count(self, model: str, api: str, status: Status) -> None:
        self.metrics.requests.labels(model, api, status.name).inc()
