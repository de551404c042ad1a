"""Admission: which calls may start now, and how many bytes each may hold while it runs.

Protocol-neutral, so every front-end's edge applies the same rules. The edge opens a
`Call` before it reads a request (refused at once, never queued, when the server or this
client is at its cap), and every layer charges the call for what it holds: the received
message, decoded pixels, tensors made for the request (those read from the message are
views of it, charged with it) and the pending response. A
charge past the memory budget refuses the call before the allocation it stands for.
Closing the call gives everything back. Probes are never refused: they hold nothing.

Fair share at the cap: a call whose request message has not arrived yet holds a slot but
does no work. When every slot is taken, a new call from a client holding less than its
share (the cap over the clients holding calls) takes the slot of the oldest such waiting
call of the client holding the most, if that client holds at least two more calls than
the newcomer. A flood of headers from a few connections then cannot shut out a client
that sends whole requests; the flood's calls never evict one another. A call whose
request does not arrive in time is ended the same way, by `expire_waiting`.

Everything here runs once per call, so it is written as plain arithmetic on counters:
no clock, no lock and no metrics call unless a call is refused, waits, or holds bytes
charged from another thread.
"""

from __future__ import annotations

import asyncio
import enum
import threading
from dataclasses import dataclass

from service.observability.metrics import Metrics
from service.status import ServingError, Status, outcome


class Kind(enum.Enum):
    PROBE = enum.auto()
    """Liveness and readiness: answered whatever other clients do."""
    STREAM = enum.auto()
    """Streams a client may hold open (health watches, reflection, inference streams):
    a pool of their own."""
    WORK = enum.auto()


@dataclass(frozen=True)
class AdmissionLimits:
    max_calls: int
    """Calls in progress across all clients (probes not counted). How many one client
    connection may start is HTTP/2's to bound (its max concurrent streams)."""
    max_streams: int
    memory_budget_bytes: int
    max_bytes_per_connection: int


class Call:
    """One call's claim on the server, from admission to its count: counted while it
    runs, charged for what it holds. As a context manager (`with admission.admit(...) as
    call:`) leaving the block ends it, counted with `call.status` if set, else the status
    the block ended with."""

    __slots__ = ("api", "client", "kind", "model", "held", "stop", "status", "task",
                 "waiting_since", "refusal", "_admission")

    def __init__(self, api: str, client: str, kind: Kind, admission: Admission | None = None
                 ) -> None:
        self.api = api
        self.client = client
        self.kind = kind
        self.model = "unknown"
        """The model it named, once the core found it (unknown names are not labels)."""
        self.held = 0
        self.stop: threading.Event | None = None
        """Set when the caller is gone or its deadline passed: work off the loop stops."""
        self.status: Status | None = None
        """The status its client saw, where the edge knows it better than the exception
        that ended the call (an answer the protocol wrote itself)."""
        self.task: asyncio.Task[object] | None = None
        """The task reading its request, while `waiting_since` is set."""
        self.waiting_since: int | None = None
        """The admission's sweep count when it began to wait for its request message;
        None once the message arrived (or for calls that never wait)."""
        self.refusal: ServingError | None = None
        """Why admission ended the call while it waited (its task was cancelled)."""
        self._admission = admission

    def __enter__(self) -> Call:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        status = self.status
        if status is None:
            status = Status.OK if exc is None else outcome(exc)
        self.end(status)

    def end(self, status: Status) -> None:
        """Close the call and count it once, with the status its client saw."""
        admission = self._admission
        if admission is not None:
            admission.close(self)
            admission.metrics.requests[self.model, self.api, status] += 1

    def charge(self, nbytes: int, what: str) -> None:
        """Hold `nbytes` more until the call ends, or RESOURCE_EXHAUSTED if that is past a
        budget. Safe from worker threads."""
        if self._admission is not None and self.kind is not Kind.PROBE:
            self._admission.charge(self, nbytes, what)

    def wait_for_request(self, task: asyncio.Task[object]) -> None:
        """Its request message has not arrived: the call may be evicted or expired, which
        cancels `task` and leaves the reason in `refusal`."""
        if self._admission is not None and self.kind is Kind.WORK:
            self.task = task
            self.waiting_since = self._admission.sweeps

    def request_arrived(self) -> None:
        self.waiting_since = None
        self.task = None

    @property
    def stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    @property
    def admission(self) -> Admission | None:
        return self._admission

    def sibling(self, api: str) -> Call:
        """A new call from this call's client: one request of a stream, admitted and
        counted as a call of its own while the stream goes on."""
        if self._admission is None:
            raise RuntimeError("a call made outside admission has no siblings")
        return self._admission.admit(api, self.client, Kind.WORK)


class Admission:
    def __init__(self, limits: AdmissionLimits, metrics: Metrics) -> None:
        self.limits = limits
        self.metrics = metrics
        self.calls = 0
        self.streams = 0
        self.held = 0
        self.sweeps = 0
        """How often `expire_waiting` ran: the clock of calls waiting for their request."""
        self._calls_by_client: dict[str, int] = {}
        self._bytes_by_client: dict[str, int] = {}
        self._open: dict[Call, None] = {}
        """Calls of kind WORK in progress, oldest first."""
        self._lock = threading.Lock()  # charges come from decode threads too

    def admit(self, api: str, client: str, kind: Kind) -> Call:
        """A new call (see `Call`), or ServingError, counted, if it may not start now."""
        try:
            return self.open(api, client, kind)
        except ServingError as exc:
            self.metrics.requests["unknown", api, exc.status] += 1
            raise

    def count(self, model: str, api: str, status: Status) -> None:
        """A call refused before admission (unknown method, no token): the counter."""
        self.metrics.requests[model, api, status] += 1

    def open(self, api: str, client: str, kind: Kind) -> Call:
        """A new call from `client` (its connection: the peer's address and port), or
        RESOURCE_EXHAUSTED if it may not start now."""
        call = Call(api, client, kind, self)
        if kind is Kind.WORK:
            if self.calls >= self.limits.max_calls and not self._evict_for(client):
                raise ServingError(Status.RESOURCE_EXHAUSTED,
                                   f"the server is at its limit of {self.limits.max_calls} "
                                   "calls in progress; retry with backoff")
            self.calls += 1
            self._calls_by_client[client] = self._calls_by_client.get(client, 0) + 1
            self._open[call] = None
        elif kind is Kind.STREAM:
            if self.streams >= self.limits.max_streams:
                raise ServingError(Status.RESOURCE_EXHAUSTED,
                                   f"the server holds its limit of {self.limits.max_streams} "
                                   "open streams; close one, or poll Health/Check instead of "
                                   "watching")
            self.streams += 1
        self.metrics.in_flight[api] += 1
        return call

    def close(self, call: Call) -> None:
        if call.stop is not None:
            call.stop.set()
        if call.held:
            self._give_back(call)
        if call.kind is Kind.WORK:
            if call in self._open:  # else its slot went already, when it was evicted
                del self._open[call]
                self._release_slot(call)
        elif call.kind is Kind.STREAM:
            self.streams -= 1
        self.metrics.in_flight[call.api] -= 1

    def _release_slot(self, call: Call) -> None:
        self.calls -= 1
        left = self._calls_by_client[call.client] - 1
        if left:
            self._calls_by_client[call.client] = left
        else:
            del self._calls_by_client[call.client]

    def _end_waiting(self, call: Call, refusal: ServingError) -> None:
        """End a call that waits for its request: its slot is free at once, and its task,
        cancelled, answers `refusal`."""
        del self._open[call]
        self._release_slot(call)
        task, call.refusal = call.task, refusal
        call.request_arrived()
        if task is not None:
            task.cancel()

    def _evict_for(self, client: str) -> bool:
        """Make room for `client` at the cap by evicting a waiting call of the client
        holding the most, if `client` holds less than its share (see the module's doc)."""
        by_client = self._calls_by_client
        mine = by_client.get(client, 0)
        if mine >= self.limits.max_calls // (len(by_client) + (mine == 0)):
            return False
        waiting = [c for c in self._open if c.waiting_since is not None]
        if not waiting:
            return False
        heaviest = max({c.client for c in waiting}, key=by_client.__getitem__)
        if by_client[heaviest] < mine + 2:
            return False
        victim = next(c for c in waiting if c.client == heaviest)  # its oldest
        self._end_waiting(victim, ServingError(
            Status.RESOURCE_EXHAUSTED,
            f"the server is at its limit of {self.limits.max_calls} calls and this call's "
            "request had not arrived: its slot went to a client holding fewer calls"))
        return True

    def expire_waiting(self, after_sweeps: int, timeout_s: float) -> int:
        """One sweep: end the calls that have waited for their request message for
        `after_sweeps` sweeps (DEADLINE_EXCEEDED, naming `timeout_s`); returns how many."""
        self.sweeps += 1
        expired = [c for c in self._open
                   if c.waiting_since is not None and self.sweeps - c.waiting_since >= after_sweeps]
        for call in expired:
            self._end_waiting(call, ServingError(
                Status.DEADLINE_EXCEEDED,
                f"no request message arrived within {timeout_s:g}s of the call's headers"))
        return len(expired)

    def charge(self, call: Call, nbytes: int, what: str) -> None:
        limits = self.limits
        with self._lock:
            client_held = self._bytes_by_client.get(call.client, 0) + nbytes
            if self.held + nbytes > limits.memory_budget_bytes:
                raise ServingError(Status.RESOURCE_EXHAUSTED,
                                   f"{what} needs {nbytes} bytes; the server's memory "
                                   f"budget ({limits.memory_budget_bytes} bytes) is "
                                   f"{self.held / limits.memory_budget_bytes:.0%} used: retry")
            if client_held > limits.max_bytes_per_connection:
                raise ServingError(Status.RESOURCE_EXHAUSTED,
                                   f"{what} needs {nbytes} bytes; this connection already "
                                   f"holds {client_held - nbytes} of its "
                                   f"{limits.max_bytes_per_connection}")
            self.held += nbytes
            self._bytes_by_client[call.client] = client_held
            call.held += nbytes
            self.metrics.held_bytes = self.held

    def _give_back(self, call: Call) -> None:
        with self._lock:
            self.held -= call.held
            left = self._bytes_by_client[call.client] - call.held
            if left:
                self._bytes_by_client[call.client] = left
            else:
                del self._bytes_by_client[call.client]
            call.held = 0
            self.metrics.held_bytes = self.held
