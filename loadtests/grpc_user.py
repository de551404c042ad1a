"""A Locust `User` for gRPC, as Locust documents for non-HTTP protocols.

Every call goes through a client interceptor that reports it with `events.request`
(name, response time, response length, exception), so Locust's statistics, CSV and
web UI see gRPC calls like HTTP ones. Failed calls are failures carrying their status
code, never dropped. grpc must be made gevent-friendly before any channel exists.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User
from locust.env import Environment
from locust.exception import LocustError

grpc_gevent.init_gevent()


class GrpcCallError(Exception):
    """A failed call as Locust reports it: `<STATUS>: <details>`."""


class _ReportingInterceptor(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, environment: Environment) -> None:
        self.environment = environment

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any,
                              request: Any) -> Any:
        started = time.perf_counter()
        outcome = continuation(details, request)
        exception: Exception | None = None
        length = 0
        try:
            length = outcome.result().ByteSize()
        except grpc.RpcError as exc:
            exception = GrpcCallError(f"{exc.code().name}: {exc.details()}")
        self.environment.events.request.fire(
            request_type="grpc", name=details.method.rsplit("/", 1)[-1],
            response_time=(time.perf_counter() - started) * 1000, response_length=length,
            response=None, context=None, exception=exception)
        return outcome


class GrpcUser(User):
    """Opens one channel per simulated user to `host` (host:port, no scheme)."""

    abstract = True
    stub_class: Any = None

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        if not self.host or self.stub_class is None:
            raise LocustError("set --host host:port and a stub_class")
        target = self.host.split("://", 1)[-1]
        options = [("grpc.max_receive_message_length", 64 << 20),
                   ("grpc.max_send_message_length", 64 << 20)]
        self.setup_channel = grpc.insecure_channel(target, options)
        """For set-up calls that should not count in the statistics."""
        self.channel = grpc.intercept_channel(self.setup_channel,
                                              _ReportingInterceptor(environment))
        self.stub = self.stub_class(self.channel)

    def on_stop(self) -> None:
        self.setup_channel.close()
