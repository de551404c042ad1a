"""`python -m service.client`: classify image files (or held-out digits) with a running server.

Uses the typed classifier API, so it sends the images' encoded bytes and needs no
numpy; the digits fallback encodes mnist5k test images as PNG first.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from contract.table import format_table
from protos import classifier_pb2 as pb
from protos import classifier_pb2_grpc as pb_grpc


def test_digits(count: int) -> list[tuple[str, bytes, str]]:
    """(name, PNG bytes, true label) for the first `count` mnist5k test images."""
    from contract.datasets import encode_png, load_dataset

    test = load_dataset("mnist5k").test
    return [(f"mnist5k-test-{i}", encode_png(test.images[i]), str(test.labels[i]))
            for i in range(min(count, len(test)))]


def open_channel(address: str, tls_ca: Path | None = None, tls_cert: Path | None = None,
                 tls_key: Path | None = None,
                 options: Sequence[tuple[str, int]] = ()) -> grpc.Channel:
    """Plaintext, or TLS when a CA (or a client certificate, for mutual TLS) is given."""
    if tls_ca is None and tls_cert is None:
        return grpc.insecure_channel(address, options=list(options))
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("a client certificate needs both tls_cert and tls_key")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls_ca.read_bytes() if tls_ca else None,
        private_key=tls_key.read_bytes() if tls_key else None,
        certificate_chain=tls_cert.read_bytes() if tls_cert else None)
    return grpc.secure_channel(address, credentials, options=list(options))


def wait_until_serving(channel: grpc.Channel, timeout: float) -> None:
    """Block until the health service says SERVING; raise after `timeout` seconds."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        try:
            # wait_for_ready holds the call until the server accepts connections.
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=max(remaining, 0.1),
                                  wait_for_ready=True).status
        except grpc.RpcError:
            if time.monotonic() >= deadline:
                raise
            continue
        if status == health_pb2.HealthCheckResponse.SERVING:
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"server not SERVING after {timeout:.0f}s (status {status})")
        time.sleep(0.2)


def health_check(address: str, timeout: float, tls_ca: Path | None) -> int:
    """Print the server's overall health status; 0 if SERVING, 1 otherwise."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with open_channel(address, tls_ca) as channel:
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout).status
        except grpc.RpcError as exc:
            print(f"{address}: {exc.code().name}", file=sys.stderr)
            return 1
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    print(f"{address}: {name}")
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.client", description=__doc__)
    p.add_argument("images", nargs="*", type=Path, help="image files (PNG, JPEG, ...)")
    p.add_argument("--address", default="127.0.0.1:8001")
    p.add_argument("--model", action="append", help="model(s) to ask (default: every model)")
    p.add_argument("--digits", type=int, default=8,
                   help="with no files: how many mnist5k test digits to send")
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="first wait up to this long for the server to report SERVING")
    p.add_argument("--tls-ca", type=Path, help="CA bundle to verify a TLS server with")
    p.add_argument("--tls-cert", type=Path, help="client certificate (mutual TLS)")
    p.add_argument("--tls-key", type=Path, help="client private key (mutual TLS)")
    p.add_argument("--token", default=os.environ.get("CNNSERVE_CLIENT_TOKEN"),
                   help="bearer token (default: $CNNSERVE_CLIENT_TOKEN)")
    p.add_argument("--health", action="store_true",
                   help="only ask the gRPC health service; exit 0 if SERVING (probes)")
    args = p.parse_args(argv)
    if args.health:
        return health_check(args.address, args.timeout, args.tls_ca)
    metadata = [("authorization", f"Bearer {args.token}")] if args.token else []

    inputs = ([(str(path), path.read_bytes(), "") for path in args.images] if args.images
              else test_digits(args.digits))
    with open_channel(args.address, args.tls_ca, args.tls_cert, args.tls_key) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        try:
            if args.wait:
                wait_until_serving(channel, args.wait)
            served = stub.ListModels(pb.ListModelsRequest(), timeout=args.timeout,
                                     metadata=metadata).models
            models = args.model or [m.name for m in served if m.ready]
            rows = []
            for model in models:
                response = stub.Predict(pb.PredictRequest(
                    model=model, top_k=args.top_k,
                    images=[pb.Image(encoded=data) for _, data, _ in inputs]),
                    timeout=args.timeout, metadata=metadata)
                for (name, _, truth), result in zip(inputs, response.classifications,
                                                    strict=True):
                    best = result.predictions[0]
                    rows.append([f"{model}:{response.version}", name, truth or "?",
                                 ", ".join(f"{p.label} ({p.probability:.3f})"
                                           for p in result.predictions),
                                 "" if not truth else ("ok" if best.label == truth else "MISS")])
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        except TimeoutError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    print(format_table(("model", "image", "true", "predicted (probability)", ""), rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
