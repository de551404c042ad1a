"""Admission: which calls may start now, and how many bytes each may hold while it runs.

Protocol-neutral, so every front-end's edge applies the same rules. The edge opens a
`Call` before it reads a request (refused at once, never queued, when the server or this
client is at its cap), and every layer charges the call for what it holds: the received
message, decoded pixels, the tensor in the batcher's queue, the pending response. A
charge past the memory budget refuses the call before the allocation it stands for.
Closing the call gives everything back. Probes are never refused: they hold nothing.

Fair share at the cap: a call whose request message has not arrived yet holds a slot but
does no work. When every slot is taken, a new call from a client holding less than its
share (the cap over the clients holding calls) takes the slot of the oldest such waiting
call of the client holding the most, if that client holds at least two more calls than
the newcomer. A flood of headers from a few connections then cannot shut out a client
that sends whole requests; the flood's calls never evict one another.
"""

from __future__ import annotations

import enum
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from service.observability.metrics import Metrics
from service.status import ServingError, Status, outcome


class Kind(enum.Enum):
    PROBE = enum.auto()
    """Liveness and readiness: answered whatever other clients do."""
    STREAM = enum.auto()
    """Streams a client may hold open (health watches, reflection): a pool of their own."""
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
    """One call's claim on the server: counted while it runs, charged for what it holds."""

    __slots__ = ("api", "client", "kind", "model", "held", "stop", "evicted", "status",
                 "_evict", "_counted", "_admission")

    def __init__(self, api: str, client: str, kind: Kind,
                 admission: Admission | None = None) -> None:
        self.api = api
        self.client = client
        self.kind = kind
        self.model = "unknown"
        """The model it named, once the core found it (unknown names are not labels)."""
        self.held = 0
        self.stop: threading.Event | None = None
        """Set when the caller is gone or its deadline passed: work off the loop stops."""
        self.evicted = False
        """Its slot went to a client holding fewer calls before its request arrived."""
        self.status: Status | None = None
        """The status its client saw, where the edge knows it better than the exception
        that ended the call (an answer the protocol wrote itself)."""
        self._evict: Callable[[], object] | None = None
        self._counted = kind is Kind.WORK
        self._admission = admission

    def charge(self, nbytes: int, what: str) -> None:
        """Hold `nbytes` more until the call ends, or RESOURCE_EXHAUSTED if that is past a
        budget. Safe from worker threads."""
        if self._admission is not None:
            self._admission.charge(self, nbytes, what)

    @property
    def stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    @property
    def admission(self) -> Admission | None:
        return self._admission

    def sibling(self, api: str) -> Admitted:
        """A new call from this call's client: one request of a stream, admitted and
        counted as a call of its own while the stream goes on."""
        if self._admission is None:
            raise RuntimeError("a call made outside admission has no siblings")
        return self._admission.admit(api, self.client, Kind.WORK)


class Admitted:
    """One call from admission to its count, for every edge and each request of a stream:
    `with admission.admit(api, client, kind) as call:` opens the call (a refusal is counted
    and raised as ServingError), and leaving the block closes it and counts it once, with
    the status its client sees: `call.status` if set, else the one the block ended with."""

    __slots__ = ("_admission", "_api", "_client", "_kind", "_call")

    def __init__(self, admission: Admission, api: str, client: str, kind: Kind) -> None:
        self._admission, self._api, self._client, self._kind = admission, api, client, kind

    def __enter__(self) -> Call:
        try:
            self._call = self._admission.open(self._api, self._client, self._kind)
        except ServingError as exc:
            self._admission.count("unknown", self._api, exc.status)
            raise
        return self._call

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        call = self._call
        status = call.status
        if status is None:
            status = Status.OK if exc is None else outcome(exc)
        self._admission.close(call)
        self._admission.count(call.model, self._api, status)


class Admission:
    def __init__(self, limits: AdmissionLimits, metrics: Metrics) -> None:
        self.limits = limits
        self.metrics = metrics
        self.calls = 0
        self.streams = 0
        self.held = 0
        self._bytes_by_client: Counter[str] = Counter()
        self._calls_by_client: Counter[str] = Counter()
        self._waiting: dict[str, dict[Call, None]] = {}
        """Per client, its calls whose request has not arrived, oldest first."""
        self._lock = threading.Lock()  # charges come from decode threads too

    def admit(self, api: str, client: str, kind: Kind) -> Admitted:
        """The context every call runs in (see `Admitted`)."""
        return Admitted(self, api, client, kind)

    def count(self, model: str, api: str, status: Status) -> None:
        """One call answered (or refused) with `status`: the requests counter."""
        self.metrics.requests[model, api, status] += 1

    def open(self, api: str, client: str, kind: Kind) -> Call:
        """A new call from `client` (its connection: the peer's address and port), or
        RESOURCE_EXHAUSTED if it may not start now."""
        limits = self.limits
        if kind is Kind.STREAM:
            if self.streams >= limits.max_streams:
                raise ServingError(Status.RESOURCE_EXHAUSTED,
                                   f"the server holds its limit of {limits.max_streams} open "
                                   "streams (health watches, reflection); poll Health/Check "
                                   "instead")
            self.streams += 1
        elif kind is Kind.WORK:
            if self.calls >= limits.max_calls and not self._evict_for(client):
                raise ServingError(Status.RESOURCE_EXHAUSTED,
                                   f"the server is at its limit of {limits.max_calls} calls in "
                                   "progress; retry with backoff")
            self.calls += 1
            self._calls_by_client[client] += 1
        self.metrics.in_flight[api] += 1
        return Call(api, client, kind, self)

    def awaiting_request(self, call: Call, evict: Callable[[], object]) -> None:
        """`call` holds a slot while its request has not arrived: `evict` ends it."""
        if call._counted:
            call._evict = evict
            self._waiting.setdefault(call.client, {})[call] = None

    def request_arrived(self, call: Call) -> None:
        call._evict = None
        waiting = self._waiting.get(call.client)
        if waiting is not None:
            waiting.pop(call, None)
            if not waiting:
                del self._waiting[call.client]

    def _evict_for(self, client: str) -> bool:
        """Make room for `client` at the cap by evicting a waiting call of the client
        holding the most, if `client` holds less than its share (see the module's doc)."""
        mine = self._calls_by_client.get(client, 0)
        if mine >= self.limits.max_calls // (len(self._calls_by_client) + (mine == 0)):
            return False
        heaviest = max(self._waiting, key=self._calls_by_client.__getitem__, default=None)
        if heaviest is None or self._calls_by_client[heaviest] < mine + 2:
            return False
        victim = next(iter(self._waiting[heaviest]))
        evict = victim._evict
        self.request_arrived(victim)
        self._release_slot(victim)
        victim.evicted = True
        assert evict is not None
        evict()
        return True

    def _release_slot(self, call: Call) -> None:
        if call._counted:
            call._counted = False
            self.calls -= 1
            left = self._calls_by_client[call.client] - 1
            if left:
                self._calls_by_client[call.client] = left
            else:
                del self._calls_by_client[call.client]

    def charge(self, call: Call, nbytes: int, what: str) -> None:
        if call.kind is Kind.PROBE:  # probes hold a few bytes, and must always answer
            return
        limits = self.limits
        with self._lock:
            client_held = self._bytes_by_client[call.client] + nbytes
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

    def close(self, call: Call) -> None:
        if call.stop is not None:
            call.stop.set()
        with self._lock:
            if call.held:
                self.held -= call.held
                left = self._bytes_by_client[call.client] - call.held
                if left:
                    self._bytes_by_client[call.client] = left
                else:
                    del self._bytes_by_client[call.client]
                call.held = 0
                self.metrics.held_bytes = self.held
        if call.kind is Kind.STREAM:
            self.streams -= 1
        elif call.kind is Kind.WORK:
            self.request_arrived(call)
            self._release_slot(call)
        self.metrics.in_flight[call.api] -= 1
