"""Protocol-neutral call outcomes, and the one error every layer refuses a call with."""

from __future__ import annotations

import asyncio
import enum
import re
from typing import NoReturn

MAX_MESSAGE_CHARS = 400
"""Error texts travel in a response header; a client must not be able to inflate them."""
_REPR = re.compile(r"<[^<>]{0,200} at 0x[0-9a-fA-F]+>")


class Status(enum.Enum):
    """The names are gRPC's, and are the metrics' `code` label; the values are gRPC's
    code numbers."""

    OK, CANCELLED, INVALID_ARGUMENT, DEADLINE_EXCEEDED, NOT_FOUND, ALREADY_EXISTS = (
        0, 1, 3, 4, 5, 6)
    RESOURCE_EXHAUSTED, FAILED_PRECONDITION, UNIMPLEMENTED, INTERNAL, UNAVAILABLE = (
        8, 9, 12, 13, 14)
    UNAUTHENTICATED = 16

    # Members are singletons: hashed by identity, in C. Enum's own __hash__ is a Python
    # call, and every call's count is keyed by its status.
    __hash__ = object.__hash__


def bounded(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text` without Python object reprs, cut to `limit` characters (saying how long it was)."""
    text = _REPR.sub("<object>", text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def shown(name: str, limit: int = 80) -> str:
    """A client-supplied name quoted for an error text, cut if it is long."""
    return repr(name if len(name) <= limit else f"{name[:limit]}...")


class ServingError(Exception):
    """A call the server refuses, with the status to refuse it with and a bounded message."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(bounded(message))
        self.status = status


def outcome(exc: BaseException) -> Status:
    """The status a call ends with when `exc` ends it."""
    if isinstance(exc, ServingError):
        return exc.status
    return Status.CANCELLED if isinstance(exc, asyncio.CancelledError) else Status.INTERNAL


def invalid(message: str) -> NoReturn:
    raise ServingError(Status.INVALID_ARGUMENT, message)
