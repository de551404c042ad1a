"""A Locust `User` for gRPC, as Locust documents for non-HTTP protocols.

Every call goes through a client interceptor that reports it with `events.request`
(name, response time, response length, exception), so Locust's statistics, CSV and
web UI see gRPC calls like HTTP ones. Failed calls are failures carrying their status
code, never dropped. grpc must be made gevent-friendly before any channel exists.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User
from locust.env import Environment
from locust.exception import LocustError

from service.client import open_channel

grpc_gevent.init_gevent()


class GrpcCallError(Exception):
    """A failed call as Locust reports it: `<STATUS>: <details>`."""


class _CallDetails(grpc.ClientCallDetails):  # type: ignore[misc]
    def __init__(self, details: Any, metadata: list[tuple[str, str]]) -> None:
        self.method, self.timeout = details.method, details.timeout
        self.credentials, self.wait_for_ready = details.credentials, details.wait_for_ready
        self.compression = details.compression
        self.metadata = [*(details.metadata or ()), *metadata]


class _ReportingInterceptor(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, environment: Environment, metadata: list[tuple[str, str]],
                 user: GrpcUser) -> None:
        self.environment = environment
        self.metadata = metadata
        self.user = user

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any,
                              request: Any) -> Any:
        if self.metadata:
            details = _CallDetails(details, self.metadata)
        started = time.perf_counter()
        outcome = continuation(details, request)
        exception: Exception | None = None
        length = 0
        try:
            length = outcome.result().ByteSize()
        except grpc.RpcError as exc:
            exception = GrpcCallError(f"{exc.code().name}: {exc.details()}")
        self.environment.events.request.fire(
            request_type="grpc", name=details.method.rsplit("/", 1)[-1] + self.user.row_label,
            response_time=(time.perf_counter() - started) * 1000, response_length=length,
            response=None, context=None, exception=exception)
        return outcome


class GrpcUser(User):
    """Opens one channel per simulated user to `host` (host:port, no scheme).

    TLS and bearer tokens come from the --grpc-ca-file, --grpc-cert-file, --grpc-key-file
    and --grpc-token options when the locustfile defines them.
    """

    abstract = True
    stub_class: Any = None
    row_label = ""
    """Appended to the method in each call's row name (e.g. " lenet x1")."""

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        if not self.host or self.stub_class is None:
            raise LocustError("set --host host:port and a stub_class")
        target = self.host.split("://", 1)[-1]
        options = [("grpc.max_receive_message_length", 64 << 20),
                   ("grpc.max_send_message_length", 64 << 20)]
        parsed = environment.parsed_options

        def option(name: str) -> Any:
            return getattr(parsed, name, None) if parsed is not None else None

        ca, cert, key = (Path(p) if p else None for p in (
            option("grpc_ca_file"), option("grpc_cert_file"), option("grpc_key_file")))
        self.setup_channel = open_channel(target, ca, cert, key, options=options)
        """For set-up calls that should not count in the statistics."""
        token = option("grpc_token")
        self.metadata = [("authorization", f"Bearer {token}")] if token else []
        self.channel = grpc.intercept_channel(
            self.setup_channel, _ReportingInterceptor(environment, self.metadata, self))
        self.stub = self.stub_class(self.channel)

    def on_stop(self) -> None:
        self.setup_channel.close()
