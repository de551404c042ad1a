"""The Prometheus endpoint: `GET /metrics`, and nothing else, on a port of its own.

prometheus_client's own server starts a thread per connection and keeps it as long as
the client likes, and answers 200 on every path (so an HTTP probe pointed at it always
passes). This one runs an asyncio loop on one thread of its own, away from the serving
loop: a bounded number of connections, a deadline for each request's head, an idle
timeout between keep-alive requests, 404 off /metrics and 405 for other methods. HTTP/1.1
is parsed by h11. At the connection cap a new connection closes the oldest one that is
waiting for a request head (half-open or idle), so held connections cannot keep a
scraper out; only when all of them are mid-answer is the new one refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import threading
from collections.abc import Iterator
from http import HTTPStatus

import h11
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from service.observability.logs import Throttled

log = logging.getLogger(__name__)
MAX_CONNECTIONS = 512
"""Asyncio connections cost a few kilobytes each; past the cap the oldest waiting one goes."""
HEAD_TIMEOUT_S = 5.0
"""A request's line and headers must arrive within this."""
IDLE_TIMEOUT_S = 60.0
"""A keep-alive connection may wait this long for its next request (scrapes come every
15-60 s)."""
WRITE_TIMEOUT_S = 10.0
MAX_HEAD_BYTES = 16 * 1024


class MetricsServer:
    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self.connections = 0
        self._waiting: dict[asyncio.Task[None], None] = {}
        """Connections waiting for a request's head, oldest first: the ones to close at the cap."""
        self._refused = Throttled(log)
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="metrics-http", daemon=True)

    @classmethod
    @contextlib.contextmanager
    def serving(cls, registry: CollectorRegistry, host: str, port: int | None
                ) -> Iterator[MetricsServer | None]:
        """Serve `registry` on `port` for the duration of the block; nothing if port is None."""
        if port is None:
            yield None
            return
        server = cls(registry, host, port)
        server.start()
        try:
            yield server
        finally:
            server.stop()

    def start(self) -> None:
        """Bind and start serving; raises OSError if the port cannot be bound."""
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - handed to start()'s caller
            self._error = exc
            self._started.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._connection, self.host, self.port,
                                            limit=MAX_HEAD_BYTES)
        self.port = server.sockets[0].getsockname()[1]
        self._started.set()
        async with server:
            await self._stop.wait()

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        if self.connections >= MAX_CONNECTIONS:
            if not self._waiting:
                self._refused(logging.WARNING, "metrics endpoint: refused a connection beyond "
                              "its %d open ones, all of them answering", MAX_CONNECTIONS)
                writer.close()
                return
            oldest = next(iter(self._waiting))
            del self._waiting[oldest]
            oldest.cancel()
            self._refused(logging.WARNING, "metrics endpoint: at its %d connections, closed "
                          "the longest waiting for a request", MAX_CONNECTIONS)
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        try:
            timeout = HEAD_TIMEOUT_S
            while True:
                self._waiting[task] = None
                try:
                    event = await _next_event(conn, reader, timeout)
                finally:
                    self._waiting.pop(task, None)
                if not isinstance(event, h11.Request):
                    break  # the client closed, or a protocol error was answered
                await _send(writer, conn, self._answer(event))
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
                timeout = IDLE_TIMEOUT_S
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                with contextlib.suppress(Exception):
                    await _send(writer, conn, _plain(exc.error_status_hint, "bad request\n"))
        except (TimeoutError, ConnectionError, h11.LocalProtocolError, asyncio.CancelledError):
            pass  # CancelledError: closed to make room, or the endpoint is stopping
        finally:
            self.connections -= 1
            writer.close()

    def _answer(self, request: h11.Request) -> tuple[h11.Response, bytes]:
        target = request.target.split(b"?", 1)[0]
        if request.method not in (b"GET", b"HEAD"):
            response, body = _plain(405, "only GET and HEAD\n", [(b"Allow", b"GET, HEAD")])
        elif target != b"/metrics":
            response, body = _plain(404, "metrics are at /metrics\n")
        else:
            headers = dict(request.headers)
            encoder, content_type = choose_encoder(headers.get(b"accept", b"").decode("latin-1"))
            body = encoder(self.registry)
            extra = []
            if b"gzip" in headers.get(b"accept-encoding", b""):
                body = gzip.compress(body, compresslevel=3)
                extra.append((b"Content-Encoding", b"gzip"))
            response = h11.Response(status_code=200, reason=b"OK", headers=[
                (b"Content-Type", content_type.encode()),
                (b"Content-Length", str(len(body)).encode()), *extra])
        if request.method == b"HEAD":
            body = b""
        return response, body


def _plain(status: int, text: str, extra: list[tuple[bytes, bytes]] | None = None
           ) -> tuple[h11.Response, bytes]:
    body = text.encode()
    return h11.Response(status_code=status, reason=HTTPStatus(status).phrase.encode(), headers=[
        (b"Content-Type", b"text/plain; charset=utf-8"),
        (b"Content-Length", str(len(body)).encode()), *(extra or [])]), body


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader, timeout: float
                      ) -> h11.Request | h11.ConnectionClosed:
    """The next request once it has all arrived (a body is read and dropped), or the
    connection's end."""
    request = None
    async with asyncio.timeout(timeout):
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(4096))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.EndOfMessage) and request is not None:
                return request
            elif isinstance(event, h11.ConnectionClosed):
                return event


async def _send(writer: asyncio.StreamWriter, conn: h11.Connection,
                answer: tuple[h11.Response, bytes]) -> None:
    response, body = answer
    writer.write(conn.send(response))
    if body:
        writer.write(conn.send(h11.Data(data=body)))
    writer.write(conn.send(h11.EndOfMessage()))
    async with asyncio.timeout(WRITE_TIMEOUT_S):
        await writer.drain()
