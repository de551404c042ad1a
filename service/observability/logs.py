"""Logging that a client cannot turn into a flood."""

from __future__ import annotations

import logging
import time

from aiohttp.http_exceptions import HttpProcessingError


class Throttled:
    """Logs one kind of event at most once per interval, saying how many were not logged."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self._log = logger
        self._interval = interval_s
        self._next = 0.0
        self._skipped = 0

    def __call__(self, level: int, message: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now < self._next:
            self._skipped += 1
            return
        if self._skipped:
            message += f" (and {self._skipped} more in the last {self._interval:g}s)"
        self._log.log(level, message, *args, exc_info=exc_info)
        self._next, self._skipped = now + self._interval, 0


class ClientsGone(logging.Filter):
    """gRPC logs an ERROR with a traceback whenever an answer cannot be sent because its
    client closed the connection first: the client's doing, and a flood of them is a
    flood of tracebacks. This turns them into one INFO line per interval, with a count."""

    PREFIX = "ExecuteBatchError raised in core by servicer method"

    def __init__(self, interval_s: float = 10.0) -> None:
        super().__init__()
        self._log = Throttled(logging.getLogger("service.edge.grpc_edge"), interval_s)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(self.PREFIX):
            return True
        self._log(logging.INFO, "an answer was not sent: its client had gone %s",
                  message[len(self.PREFIX):].strip()[:200])
        return False


class MalformedHttp(logging.Filter):
    """aiohttp logs an ERROR with a traceback for every request its parser refuses (a NUL
    byte in a header, a bad request line): the client's doing, answered 400, and a client
    can send thousands. This turns them into one bounded INFO line per interval, with a
    count; a fault of the server's own keeps its traceback."""

    def __init__(self, interval_s: float = 10.0) -> None:
        super().__init__()
        self._log = Throttled(logging.getLogger("service.edge.http_edge"), interval_s)

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, HttpProcessingError):
            return True
        self._log(logging.INFO, "refused a malformed HTTP request: %s",
                  " ".join(str(error.message).split())[:200])
        return False
