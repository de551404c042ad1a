"""Who may connect (TLS, mutual TLS) and who may call (bearer tokens).

Plaintext is the default only because development happens on loopback; listening in
plaintext anywhere else is logged as a warning at start. Tokens are compared in
constant time and never logged.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import grpc
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from service.observability.logs import Throttled

log = logging.getLogger(__name__)
AUTH_HEADER = "authorization"
BEARER = "Bearer "


class SecurityOptions(BaseModel):
    """The edge's part of the process's settings: where it listens, TLS and tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8001, ge=0, le=65535)
    tls_cert_file: Path | None = None
    """PEM certificate chain; with tls_key_file the gRPC port speaks TLS only."""
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    """PEM CA bundle: when set, clients must present a certificate it signed (mutual TLS)."""
    auth_token: SecretStr | None = None
    """Bearer token every call must carry (CNNSERVE_AUTH_TOKEN); never logged."""
    auth_tokens_file: Path | None = None
    """File of accepted bearer tokens, one per line (blank lines and # comments skipped)."""
    auth_open_services: tuple[str, ...] = (
        "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection")
    """gRPC services callable without a token (probes and tooling)."""

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def auth(self) -> bool:
        return self.auth_token is not None or self.auth_tokens_file is not None


def server_credentials(settings: SecurityOptions) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings' PEM files, or None for plaintext."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    ca = settings.tls_client_ca_file
    return grpc.ssl_server_credentials(
        [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
        root_certificates=ca.read_bytes() if ca else None,
        require_client_auth=ca is not None)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warn_if_exposed(settings: SecurityOptions) -> None:
    if settings.tls or is_loopback(settings.host):
        return
    log.warning("PLAINTEXT gRPC on %s:%s: anyone on the network can read and forge "
                "requests; set tls_cert_file and tls_key_file outside development",
                settings.host, settings.port)
    if settings.auth:
        log.warning("bearer tokens travel in plaintext on %s: enable TLS", settings.host)


def load_tokens(settings: SecurityOptions) -> list[bytes]:
    """Every accepted token; raises ValueError when auth is on but no token is usable."""
    tokens = []
    if settings.auth_token is not None:
        tokens.append(settings.auth_token.get_secret_value())
    if settings.auth_tokens_file is not None:
        lines = settings.auth_tokens_file.read_text().splitlines()
        tokens += [t.strip() for t in lines if t.strip() and not t.lstrip().startswith("#")]
    if settings.auth and not (tokens and all(tokens)):
        raise ValueError(f"authentication is on, so expected non-empty tokens in auth_token "
                         f"or auth_tokens_file, got none usable ({settings.auth_tokens_file})")
    return [t.encode() for t in tokens]


REFUSAL = ("missing or unaccepted bearer token: send the header 'authorization: Bearer "
           "<token>'")


class BearerTokens:
    """The accepted tokens, checked in constant time; for every protocol's edge."""

    def __init__(self, tokens: Sequence[bytes]) -> None:
        self._tokens = list(tokens)  # load_tokens guarantees at least one

    def accepts(self, presented: object) -> bool:
        """`presented` is the authorization header's value, as it arrived."""
        if not isinstance(presented, str) or not presented.startswith(BEARER):
            return False
        candidate = presented[len(BEARER):].encode()
        # Compare with every token, without stopping early, so timing tells nothing.
        matches = [hmac.compare_digest(candidate, token) for token in self._tokens]
        return any(matches)


def ssl_context(settings: SecurityOptions) -> ssl.SSLContext | None:
    """The same TLS (and mutual TLS) as the gRPC port's, for the HTTP port."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    if settings.tls_client_ca_file is not None:
        context.load_verify_locations(settings.tls_client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without an accepted `authorization: Bearer <token>` with UNAUTHENTICATED."""

    def __init__(self, tokens: Sequence[bytes], open_services: Sequence[str]) -> None:
        self._tokens = BearerTokens(tokens)
        self._open = frozenset(open_services)
        self._refusals = Throttled(log)

    def _accepts(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        return self._tokens.accepts(next((v for k, v in metadata or () if k == AUTH_HEADER),
                                         None))

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler | None]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        service = details.method.lstrip("/").split("/", 1)[0]
        if service in self._open or self._accepts(details.invocation_metadata):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None
        self._refusals(logging.INFO, "refused an unauthenticated call to %s",
                       details.method[:200])
        return _refusing(handler)


async def _refuse(request: object, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind that answers UNAUTHENTICATED."""
    serializers = {"request_deserializer": handler.request_deserializer,
                   "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_refuse, **serializers)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_refuse, **serializers)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_refuse, **serializers)
    return grpc.unary_unary_rpc_method_handler(_refuse, **serializers)
