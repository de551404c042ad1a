"""`python -m service`: serve a model repository over gRPC (see ServiceSettings for all knobs)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from service.app.settings import ServiceSettings
from service.observability.logs import ClientsGone, MalformedHttp

# CLI flag -> setting; flags left out fall back to CNNSERVE_* variables, the file, defaults.
_FLAGS: dict[str, dict[str, object]] = {
    "repo": {"type": Path, "help": "model repository folder"},
    "config_file": {"type": Path, "help": ".json or .toml file with any settings"},
    "host": {"help": "address to bind (default 127.0.0.1)"},
    "port": {"type": int, "help": "gRPC port (default 8001; 0 picks a free one)"},
    "metrics_port": {"type": int, "help": "Prometheus port (default 8002)"},
    "probe_port": {"type": int, "help": "liveness/readiness port (default 8003)"},
    "http_port": {"type": int, "help": "REST port (default 8000; 0 picks a free one)"},
    "workers": {"type": int, "help": "server processes sharing the port"},
    "device": {"help": "auto (default: CUDA where it can run, else the CPU, with a "
                       "warning), cpu, cuda (or exit 1 saying why), cuda:N"},
    "precision": {"choices": ("fp32", "fp16")},
    "instances": {"type": int, "help": "onnxruntime sessions per model"},
    "intra_op_threads": {"type": int},
    "max_batch_size": {"type": int, "help": "override every model's max batch size"},
    "batching": {"choices": ("budget", "delay"),
                 "help": "budget (default): batches sized to the arrivals within each "
                         "model's latency budget; delay: Triton's, the oldest waits "
                         "max_queue_delay_us"},
    "latency_budget_ms": {"type": float, "help": "default budget of models whose "
                                                 "config.json sets none (default: derived "
                                                 "from each model's measured cost)"},
    "max_queue_delay_us": {"type": int, "help": "override every model's batching delay "
                                                "(--batching delay)"},
    "max_queue_size": {"type": int},
    "max_images_per_request": {"type": int},
    "request_timeout_s": {"type": float, "help": "deadline for calls that set none"},
    "model_control_mode": {"choices": ("none", "poll", "explicit"),
                           "help": "as Triton's (default none)"},
    "load_model": {"action": "append", "help": "explicit mode: load this model at start "
                                               "(repeatable; * for all)"},
    "reload_interval_s": {"type": float, "help": "poll the repository for new versions; 0: off"},
    "tls_cert_file": {"type": Path, "help": "PEM certificate chain: serve TLS only"},
    "tls_key_file": {"type": Path, "help": "PEM private key of the certificate"},
    "tls_client_ca_file": {"type": Path, "help": "require client certificates (mutual TLS)"},
    "auth_tokens_file": {"type": Path, "help": "accepted bearer tokens, one per line "
                                               "(or CNNSERVE_AUTH_TOKEN)"},
    "log_level": {"choices": ("DEBUG", "INFO", "WARNING", "ERROR")},
}


def parse_settings(argv: Sequence[str] | None) -> tuple[ServiceSettings, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    for name, kwargs in _FLAGS.items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, **kwargs)  # type: ignore[arg-type]
    p.add_argument("--no-metrics", action="store_true", help="serve no metrics endpoint")
    p.add_argument("--no-http-port", action="store_true", help="serve no REST port")
    p.add_argument("--no-probe-port", action="store_true",
                   help="no probe listener (probes still answer on the gRPC port)")
    p.add_argument("--settings-json", type=Path, help=argparse.SUPPRESS)  # worker processes
    p.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k in _FLAGS and v is not None}
    if args.no_metrics:
        given["metrics_port"] = None
    if args.no_probe_port:
        given["probe_port"] = None
    if args.no_http_port:
        given["http_port"] = None
    if args.settings_json:
        return ServiceSettings(**json.loads(args.settings_json.read_text())), args
    return ServiceSettings(**given), args


def configure_logging(settings: ServiceSettings) -> None:
    fmt = ('{"time": "%(asctime)s", "level": "%(levelname)s", "logger": "%(name)s", '
           '"pid": %(process)d, "message": "%(message)s"}' if settings.log_json
           else "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    logging.basicConfig(level=settings.log_level, format=fmt, stream=sys.stderr)
    logging.getLogger("grpc._cython.cygrpc").addFilter(ClientsGone())
    logging.getLogger("aiohttp.server").addFilter(MalformedHttp())


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings, args = parse_settings(argv)
    except (ValidationError, ValueError) as exc:
        print(f"error: invalid configuration: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
    if settings.workers > 1 and not args.settings_json:
        from service.app.workers import supervise

        return supervise(settings)
    if args.settings_json:
        from service.app.workers import follow_supervisor

        follow_supervisor()
    from service.app.server import run

    return run(settings, reuse_port=args.settings_json is not None, worker=args.worker_index)
