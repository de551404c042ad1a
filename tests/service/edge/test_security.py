"""TLS, mutual TLS and bearer tokens, against a real server on loopback."""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2_grpc

from service.app.settings import ServiceSettings
from service.client import open_channel
from service.edge.security import warn_if_exposed
from tests.servers import ROOT, ServerProcess
from tests.service.oip import logits, request

X = np.zeros((1, 1, 28, 28), np.float32)


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    """A client certificate from a CA the server does not trust."""
    stranger_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
          issuer_key: ec.EllipticCurvePrivateKey, server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer.subject if issuer else name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None),
                              critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
           ) -> tuple[Path, Path]:
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca_key, other_ca_key = _key(), _key()
    ca = _cert("cnnserve test CA", ca_key, None, ca_key)
    other_ca = _cert("someone else's CA", other_ca_key, None, other_ca_key)
    ca_path, _ = _write(folder, "ca", ca, ca_key)
    keys = [_key() for _ in range(3)]
    server = _write(folder, "server", _cert("localhost", keys[0], ca, ca_key, server=True),
                    keys[0])
    client = _write(folder, "client", _cert("client", keys[1], ca, ca_key), keys[1])
    stranger = _write(folder, "stranger", _cert("stranger", keys[2], other_ca, other_ca_key),
                      keys[2])
    return Pki(ca_path, *server, *client, *stranger)


def infer_code(channel: grpc.Channel, metadata: list[tuple[str, str]] | None = None
               ) -> grpc.StatusCode:
    try:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request(X), timeout=10, metadata=metadata)
    except grpc.RpcError as exc:
        return exc.code()
    assert logits(response).shape == (1, 10)
    return grpc.StatusCode.OK


def test_tls_server_refuses_plaintext_and_serves_verified_clients(
        served_repo: Path, pki: Pki, server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(served_repo, "--tls-cert-file", str(pki.server_cert),
                            "--tls-key-file", str(pki.server_key))
    with grpc.insecure_channel(server.address) as plain:
        assert infer_code(plain) == grpc.StatusCode.UNAVAILABLE
    with open_channel(server.address, tls_ca=pki.ca) as secure:
        assert infer_code(secure) == grpc.StatusCode.OK
    # A client that trusts another CA does not accept the server's certificate.
    with open_channel(server.address, tls_ca=pki.stranger_cert) as wrong_trust:
        assert infer_code(wrong_trust) == grpc.StatusCode.UNAVAILABLE
    # tritonclient, unmodified, over TLS.
    client = triton.InferenceServerClient(server.address, ssl=True,
                                          root_certificates=str(pki.ca))
    assert client.is_server_ready()
    assert any("(TLS)" in line for line in server.lines)
    # The REST port speaks the same TLS, and nothing else.
    context = ssl.create_default_context(cafile=str(pki.ca))
    with urllib.request.urlopen(f"https://localhost:{server.http_port}/v2/health/ready",
                                context=context, timeout=10) as answer:
        assert answer.status == 200
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/v2/health/ready",
                               timeout=10)


def test_mutual_tls_admits_only_clients_with_a_trusted_certificate(
        served_repo: Path, pki: Pki, server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(served_repo, "--tls-cert-file", str(pki.server_cert),
                            "--tls-key-file", str(pki.server_key),
                            "--tls-client-ca-file", str(pki.ca))
    with open_channel(server.address, tls_ca=pki.ca) as anonymous:
        assert infer_code(anonymous) == grpc.StatusCode.UNAVAILABLE
    with open_channel(server.address, pki.ca, pki.stranger_cert, pki.stranger_key) as stranger:
        assert infer_code(stranger) == grpc.StatusCode.UNAVAILABLE
    with open_channel(server.address, pki.ca, pki.client_cert, pki.client_key) as member:
        assert infer_code(member) == grpc.StatusCode.OK


def test_tokens_are_required_health_stays_open_and_tokens_never_reach_the_log(
        served_repo: Path, tmp_path: Path, server_factory: Callable[..., ServerProcess]) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# accepted tokens\nfile-token-1\n\n  file-token-2  \n")
    server = server_factory(served_repo, "--auth-tokens-file", str(tokens),
                            "--log-level", "DEBUG", env={"CNNSERVE_AUTH_TOKEN": "env-token"})
    with grpc.insecure_channel(server.address) as channel:
        assert infer_code(channel) == grpc.StatusCode.UNAUTHENTICATED
        for wrong in ("Bearer nope", "Bearer file-token-", "file-token-1", "Bearer ",
                      "Basic file-token-1"):
            assert infer_code(channel, [("authorization", wrong)]) == \
                grpc.StatusCode.UNAUTHENTICATED, wrong
        for good in ("file-token-1", "file-token-2", "env-token"):
            assert infer_code(channel, [("authorization", f"Bearer {good}")]) == \
                grpc.StatusCode.OK, good
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                            timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    # tritonclient, unmodified, sends the token as a header.
    client = triton.InferenceServerClient(server.address)
    assert client.is_server_live(headers={"authorization": "Bearer env-token"})
    with pytest.raises(triton.InferenceServerException, match="UNAUTHENTICATED|bearer"):
        client.is_server_live()
    # Shared memory maps the server's /dev/shm, model control changes what it serves.
    for call in (client.get_system_shared_memory_status,
                 lambda: client.register_system_shared_memory("r", "/cnnserve-x", 8),
                 lambda: client.unload_model("lenet")):
        with pytest.raises(triton.InferenceServerException, match="UNAUTHENTICATED|bearer"):
            call()
    assert not client.get_system_shared_memory_status(
        headers={"authorization": "Bearer env-token"}).regions
    # The REST port asks for the same tokens; its health endpoints stay open for probes.
    rest = f"http://127.0.0.1:{server.http_port}"
    for headers, expected in (({}, 401), ({"Authorization": "Bearer nope"}, 401),
                              ({"Authorization": "Bearer file-token-2"}, 200)):
        try:
            with urllib.request.urlopen(urllib.request.Request(
                    f"{rest}/v2/models/lenet", headers=headers), timeout=10) as answer:
                status = answer.status
        except urllib.error.HTTPError as exc:
            status = exc.code
            assert "bearer token" in json.loads(exc.read())["error"]
        assert status == expected, headers
    with urllib.request.urlopen(f"{rest}/v2/health/ready", timeout=10) as answer:
        assert answer.status == 200
    assert server.terminate() == 0
    log = "".join(server.lines)
    assert "refused an unauthenticated call" in log
    assert not any(t in log for t in ("file-token-1", "file-token-2", "env-token"))


def test_workers_inherit_the_token_from_the_environment(
        served_repo: Path, server_factory: Callable[..., ServerProcess]) -> None:
    from tests.servers import free_port

    server = server_factory(served_repo, "--workers", "2", port=free_port(), processes=2,
                            env={"CNNSERVE_AUTH_TOKEN": "shared-secret"})
    for _ in range(4):  # new channels reach either worker
        with grpc.insecure_channel(server.address) as channel:
            assert infer_code(channel) == grpc.StatusCode.UNAUTHENTICATED
            assert infer_code(channel, [("authorization", "Bearer shared-secret")]) == \
                grpc.StatusCode.OK
    assert server.terminate() == 0


@pytest.mark.parametrize(("args", "message"), [
    (["--tls-cert-file", "cert.pem"], "needs both tls_cert_file and tls_key_file"),
    (["--tls-cert-file", "x.pem", "--tls-key-file", "y.pem"],
     "tls_cert_file: expected a readable file, got x.pem"),
    (["--auth-tokens-file", "missing-tokens"], "auth_tokens_file: expected a readable file"),
])
def test_incomplete_security_settings_stop_the_server_at_start(
        served_repo: Path, tmp_path: Path, args: list[str], message: str) -> None:
    result = subprocess.run([sys.executable, "-m", "service", "--repo", str(served_repo),
                             "--port", "0", "--no-metrics", *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_an_empty_tokens_file_stops_the_server(served_repo: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# nobody\n")
    result = subprocess.run([sys.executable, "-m", "service", "--repo", str(served_repo),
                             "--port", "0", "--no-metrics", "--auth-tokens-file", str(tokens)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "expected non-empty tokens" in result.stderr


@pytest.mark.parametrize(("host", "tls", "warned"), [
    ("127.0.0.1", False, False), ("localhost", False, False), ("::1", False, False),
    ("0.0.0.0", False, True), ("10.1.2.3", False, True), ("0.0.0.0", True, False)])
def test_plaintext_on_a_non_loopback_address_is_logged_loudly(
        pki: Pki, caplog: pytest.LogCaptureFixture, host: str, tls: bool, warned: bool) -> None:
    files = {"tls_cert_file": pki.server_cert, "tls_key_file": pki.server_key} if tls else {}
    settings = ServiceSettings(host=host, **files)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="service.edge.security"):
        warn_if_exposed(settings)
    assert ("PLAINTEXT" in caplog.text) == warned


def test_the_serving_path_loads_no_torch_and_unpickles_nothing(server: ServerProcess) -> None:
    """Models reach the server only as ONNX graphs: no torch, no pickle on that path."""
    maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
    assert "libtorch" not in maps
    service_dir = ROOT / "service"
    for source in sorted(service_dir.glob("*.py")):
        text = source.read_text()
        for unsafe in ("import pickle", "torch.load", "allow_pickle=True", "import joblib",
                       "import dill"):
            assert unsafe not in text, f"{source.name} uses {unsafe}"
