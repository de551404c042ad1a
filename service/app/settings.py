"""The service's one configuration model: defaults < config file < CNNSERVE_* env < flags.

Validated once at start; an invalid value stops the server with a message naming the
setting, what was expected and what was received.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from service.edge.security import SecurityOptions
from service.engine.options import EngineOptions

MiB = 1 << 20


class ServiceSettings(BaseSettings, EngineOptions, SecurityOptions):
    """The app's own settings; the engine's (EngineOptions) and the edge's
    (SecurityOptions) are inherited, each defined beside the code that reads it."""

    # Empty variables count as unset, so a compose file can list every setting.
    model_config = SettingsConfigDict(env_prefix="CNNSERVE_", env_nested_delimiter="__",
                                      env_ignore_empty=True, extra="forbid", frozen=True)

    config_file: Path | None = None
    """A .json or .toml file holding any of these settings (CNNSERVE_CONFIG_FILE)."""
    http_port: int | None = Field(default=8000, ge=0, le=65535)
    """The Open Inference Protocol's REST binding (Triton's 8000), with the gRPC port's
    TLS, tokens, limits and admission. None turns it off; 0 picks a free port."""
    metrics_port: int | None = Field(default=8002, ge=0, le=65535)
    """Prometheus metrics over HTTP; None turns the endpoint off."""
    probe_port: int | None = Field(default=8003, ge=0, le=65535)
    """Liveness and readiness (gRPC health Check, ServerLive/ServerReady/ModelReady) on a
    listener of their own, answered whatever load the serving port carries; plaintext,
    no token. None turns it off (probes still answer on the serving port)."""
    loop_stall_s: float = Field(default=10.0, gt=0)
    """The probe port reports the server dead once its event loop has not turned for
    this long, so the orchestrator restarts it."""
    workers: int = Field(default=1, ge=1, le=256)
    """Server processes sharing the port (SO_REUSEPORT), each with its own sessions."""

    max_message_bytes: int = Field(default=64 * MiB, ge=MiB)
    """Largest request or response message, after decompression (a 224x224 RGB batch of 32
    in FP32 is 19 MiB)."""
    compressed_requests: bool = False
    """Accept gzip/deflate-compressed request messages. Off by default: gRPC expands a
    message before any server code sees it, and a few kilobytes of gzip become tens of
    megabytes, on the event loop. Turn on for trusted clients; max_message_bytes still
    bounds what a message expands to."""
    max_images_per_request: int = Field(default=256, ge=1)
    """Server-wide cap on images in one request; a model's max_batch_size may be lower."""
    max_image_pixels: int = Field(default=4096 * 4096, ge=1)
    """Largest decoded image accepted (width x height), against decompression bombs."""
    max_decode_cost: int = Field(default=2 * 4096 * 4096, ge=1)
    """Weighted pixels one request may decode (core.images.DECODE_WEIGHT): one 4096x4096
    PNG or a 2896x2896 WebP. WebP holds the GIL while it decodes, which is why it weighs
    most."""
    decode_threads: int = Field(default=1, ge=1, le=64)
    """Threads decoding images, never the event loop's; requests beyond them queue. One
    leaves a small host a core for the event loop; raise it on larger hosts."""

    memory_budget_bytes: int = Field(default=1024 * MiB, ge=16 * MiB)
    """What all calls in progress may hold together: received messages (x2, bytes and
    parse), decoded pixels, queued tensors, pending responses. Past it a call is refused
    with RESOURCE_EXHAUSTED before it allocates. 1 GiB leaves a 2 GiB container room for
    the runtime and the models' sessions."""
    max_bytes_per_connection: int = Field(default=256 * MiB, ge=MiB)
    """The share of the budget one client connection may hold."""
    max_concurrent_rpcs: int = Field(default=2048, ge=1)
    """Calls in progress per process (probes not counted: they always answer); beyond it a
    call is refused at once with RESOURCE_EXHAUSTED."""
    max_open_streams: int = Field(default=64, ge=1)
    """Long-lived streams (health Watch, reflection) open at once, apart from the calls."""
    max_streams_per_connection: int = Field(default=256, ge=1)
    """HTTP/2 streams per client connection; a well-behaved client queues beyond it."""
    max_connections: int = Field(default=1024, ge=1)
    """Client connections per process; gRPC closes new ones beyond it."""
    request_arrival_timeout_s: float = Field(default=5.0, gt=0)
    """A call whose request message has not arrived this long after its headers ends
    with DEADLINE_EXCEEDED (checked four times in that span, so at most a quarter later):
    a stream that sends headers only holds nothing for long."""
    handshake_timeout_s: float = Field(default=10.0, gt=0)
    """A connection must finish its TLS and HTTP/2 handshake within this."""
    keepalive_time_s: float = Field(default=120.0, gt=0)
    """The server pings a connection idle this long, to find peers that vanished."""
    keepalive_timeout_s: float = Field(default=20.0, gt=0)
    min_client_ping_interval_s: float = Field(default=10.0, ge=0)
    """Clients pinging more often than this (without calls) are disconnected (GOAWAY)."""
    max_connection_idle_s: float = Field(default=600.0, gt=0)
    """A connection with no call for this long is closed (GOAWAY; clients reconnect)."""
    max_connection_age_s: float = Field(default=3600.0, gt=0)
    """Connections are recycled after this, so load spreads again after a scale-up."""
    max_connection_age_grace_s: float = Field(default=60.0, ge=0)
    """Time a recycled connection's calls get to finish (more than request_timeout_s)."""
    request_timeout_s: float = Field(default=30.0, gt=0)
    """Deadline for requests whose client set none (or a later one)."""
    grace_period_s: float = Field(default=10.0, ge=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_json: bool = False

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        file = _config_file(init_settings(), env_settings())
        if file is not None:
            if not file.is_file():
                raise ValueError(f"config_file {file} does not exist")
            source_cls = TomlConfigSettingsSource if file.suffix == ".toml" else \
                JsonConfigSettingsSource
            if file.suffix not in (".toml", ".json"):
                raise ValueError(f"config_file must end in .json or .toml, got {file.name}")
            sources.append(source_cls(settings_cls, file))
        return tuple(sources)

    @model_validator(mode="after")
    def _coherent(self) -> ServiceSettings:
        if self.max_bytes_per_connection > self.memory_budget_bytes:
            raise ValueError(f"max_bytes_per_connection ({self.max_bytes_per_connection}) must "
                             f"not exceed memory_budget_bytes ({self.memory_budget_bytes})")
        if self.load_model and self.model_control_mode != "explicit":
            raise ValueError("load_model needs model_control_mode explicit, got "
                             f"{self.model_control_mode}")
        if self.model_control_mode == "explicit" and self.workers > 1:
            raise ValueError("model_control_mode explicit needs workers 1: a load call reaches "
                             "one worker only")
        if self.workers > 1 and 0 in (self.port, self.http_port):
            raise ValueError("workers > 1 share one port: set explicit ports (port, "
                             "http_port), not 0")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("TLS needs both tls_cert_file and tls_key_file, got only "
                             f"{'tls_cert_file' if self.tls_cert_file else 'tls_key_file'}")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and "
                             "tls_key_file too")
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "auth_tokens_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: expected a readable file, got {path} (not found)")
        return self


def _config_file(*layers: dict[str, Any]) -> Path | None:
    for layer in layers:
        if layer.get("config_file"):
            return Path(layer["config_file"])
    return None
