"""The Open Inference Protocol's REST binding on the HTTP port, driven by tritonclient.http,
KServe's SDK and plain HTTP requests."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from tests.servers import ROOT, ServerProcess
from tests.service.frontends.test_grpc_inference import direct
from tests.service.oip import metric, wait_until

X = np.random.default_rng(11).standard_normal((3, 1, 28, 28)).astype(np.float32)
BINARY_HEADER = json.dumps({"inputs": [{"name": "input", "datatype": "FP32",
                                        "shape": [1, 1, 28, 28],
                                        "parameters": {"binary_data_size": 3136}}]}).encode()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> triton_http.InferenceServerClient:
    return triton_http.InferenceServerClient(f"127.0.0.1:{server.http_port}")


def call(server: ServerProcess, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None, method: str | None = None
         ) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{server.http_port}{path}", data=body,
                                     headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_tritonclient_http_reads_health_metadata_config_and_statistics(
        client: triton_http.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("lenet") and not client.is_model_ready("lenet", "7")
    assert client.get_server_metadata()["name"] == "cnnserve"
    meta = client.get_model_metadata("lenet")
    assert meta["versions"] == ["1"] and meta["inputs"][0]["shape"] == [-1, 1, 28, 28]
    config = client.get_model_config("lenet")
    assert config["max_batch_size"] == 32 and config["input"][0]["data_type"] == "TYPE_FP32"
    assert config["input"][0]["dims"] == [1, 28, 28]
    index = client.get_model_repository_index()
    assert {(m["name"], m["state"]) for m in index} >= {("lenet", "READY")}
    stats = client.get_inference_statistics("lenet")["model_stats"][0]
    assert stats["version"] == "1" and isinstance(stats["inference_count"], int)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_http_inference_equals_onnxruntime(
        client: triton_http.InferenceServerClient, served_repo: Path, binary: bool) -> None:
    tensor = triton_http.InferInput("input", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X, binary_data=binary)
    wanted = triton_http.InferRequestedOutput("logits", binary_data=binary)
    result = client.infer("lenet", [tensor], outputs=[wanted], request_id="r-1")
    np.testing.assert_allclose(result.as_numpy("logits"), direct(served_repo, "lenet", X),
                               rtol=1e-5, atol=1e-5)
    assert result.get_response()["id"] == "r-1"
    everything = client.infer("lenet", [tensor])  # no outputs named: all, in binary
    np.testing.assert_allclose(everything.as_numpy("logits"), direct(served_repo, "lenet", X),
                               rtol=1e-5, atol=1e-5)


def test_json_tensors_may_be_nested_and_answers_are_row_major(
        server: ServerProcess, served_repo: Path) -> None:
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28],
                                   "data": X[:1].tolist()}]}).encode()
    status, answer = call(server, "/v2/models/lenet/versions/1/infer", body,
                          {"Content-Type": "application/json"})
    assert status == 200
    output = json.loads(answer)["outputs"][0]
    assert output["shape"] == [1, 10] and output["datatype"] == "FP32"
    np.testing.assert_allclose(output["data"], direct(served_repo, "lenet", X[:1]).ravel(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("path", "body", "headers", "code", "message"), [
    ("/v2/models/lenet/infer", b'{"inputs": []}', {}, 400, "non-empty 'inputs'"),
    # The model is resolved before the body is read, as Triton does.
    ("/v2/models/resnet/infer", b"", {}, 404, "unknown model 'resnet'"),
    ("/v2/models/resnet/infer", b'{"inputs": []}', {}, 404, "unknown model 'resnet'"),
    ("/v2/models/resnet/infer", b'{"inputs": [{"name": "input", "datatype": "FP32", '
     b'"shape": [1], "data": [1]}]}', {}, 404, "unknown model 'resnet'"),
    ("/v2/models/lenet/infer", b"{not json", {}, 400, "not valid JSON"),
    ("/v2/models/lenet/infer", b'{"inputs": [{"name": "input", "datatype": "FP32", '
     b'"shape": [1, 1, 28, 27], "data": [0]}]}', {}, 400, "needs 756 values, got 1"),
    ("/v2/models/lenet/infer", b'{"inputs": [{"name": "input", "datatype": "FP32", '
     b'"shape": [1, 1, 28, 28], "data": ["a"]}]}', {}, 400, "is not FP32 values"),
    ("/v2/models/lenet/infer", BINARY_HEADER,
     {"Inference-Header-Content-Length": str(len(BINARY_HEADER))}, 400, "runs past"),
    ("/v2/models/lenet/infer", b"{}", {"Inference-Header-Content-Length": "x"}, 400,
     "Inference-Header-Content-Length must be"),
    ("/v2/models/lenet/infer", b'{"inputs": [{"name": "input", "datatype": "FP32", '
     b'"shape": [1, 1, 28, 28], "data": []}], "outputs": [{"name": "probs"}]}', {}, 400,
     "needs 784 values"),
    ("/v2/models/lenet/infer", b'{"inputs": [{"name": "input", "datatype": "FP32", '
     b'"shape": [100000000000000000000000], "data": [1]}]}', {}, 400, "64-bit integers"),
    ("/v2/nowhere", None, {}, 404, "Not Found"),
])
def test_bad_requests_answer_the_protocols_error_with_the_matching_status(
        server: ServerProcess, path: str, body: bytes | None, headers: dict[str, str],
        code: int, message: str) -> None:
    status, answer = call(server, path, body, headers, "POST" if body is not None else "GET")
    assert status == code, answer
    assert message in json.loads(answer)["error"], answer


def test_every_request_is_counted_with_api_http(server: ServerProcess) -> None:
    call(server, "/v2/models/lenet/infer", b"{not json")
    text = server.metrics()
    assert re.search(r'cnnserve_requests_total\{api="http",code="INVALID_ARGUMENT"', text)
    assert re.search(r'cnnserve_requests_total\{api="http",code="OK",model="lenet"\}', text)


def test_a_body_over_the_message_limit_is_413_before_it_is_read(
        served_repo: Path, server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(served_repo, env={"CNNSERVE_MAX_MESSAGE_BYTES": str(1 << 20)})
    status, answer = call(server, "/v2/models/lenet/infer", b"x" * (3 << 19))
    assert status == 413 and "error" in json.loads(answer)
    assert call(server, "/v2/health/ready")[0] == 200


def test_a_compressed_body_is_refused_unexpanded(server: ServerProcess) -> None:
    import gzip

    bomb = gzip.compress(b"[" + b"0," * 4_000_000 + b"0]")  # ~8 MB of JSON in ~8 KB
    status, answer = call(server, "/v2/models/lenet/infer", bomb,
                          {"Content-Encoding": "gzip", "Content-Type": "application/json"})
    assert status == 501 and "compressed request bodies" in json.loads(answer)["error"]


def test_connections_that_trickle_headers_are_closed_and_cannot_crowd_others_out(
        served_repo: Path, server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(served_repo, env={"CNNSERVE_REQUEST_ARRIVAL_TIMEOUT_S": "1",
                                              "CNNSERVE_MAX_CONNECTIONS": "64"})
    held = []
    for _ in range(150):  # more than the cap, none of them ever finishing its headers
        sock = socket.create_connection(("127.0.0.1", server.http_port))
        sock.sendall(b"POST /v2/models/lenet/infer HTTP/1.1\r\nHost: x\r\n")
        held.append(sock)
    try:
        started = time.monotonic()
        assert call(server, "/v2/models/lenet")[0] == 200  # a client with a whole request
        assert time.monotonic() - started < 2
        deadline = time.monotonic() + 10
        for sock in held:  # the server closes every one of them
            sock.settimeout(max(deadline - time.monotonic(), 0.1))
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(1024) == b""
    finally:
        for sock in held:
            sock.close()


def test_a_request_whose_client_hangs_up_never_reaches_the_model(
        served_repo: Path, server_factory: Callable[..., ServerProcess]) -> None:
    # A lone request waits 3 s in the queue for company; its client leaves while it waits.
    server = server_factory(served_repo, "--batching", "delay", "--max-queue-delay-us", "3000000")
    header = BINARY_HEADER
    body = header + X[:1].tobytes()
    with socket.create_connection(("127.0.0.1", server.http_port)) as sock:
        sock.sendall(b"POST /v2/models/lenet/infer HTTP/1.1\r\nHost: x\r\n"
                     b"Inference-Header-Content-Length: " + str(len(header)).encode() +
                     b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_until(lambda: metric(server.metrics(), "cnnserve_queue_depth") == 1, timeout=10)
    wait_until(lambda: 'api="http",code="CANCELLED"' in server.metrics(), timeout=10)
    # Out of the queue (taken out when cancelled, or dropped when its batch was cut) ...
    wait_until(lambda: metric(server.metrics(), "cnnserve_queue_depth") == 0, timeout=10)
    # ... and never run.
    stats = json.loads(call(server, "/v2/models/lenet/stats")[1])["model_stats"][0]
    assert (stats["inference_count"], stats["execution_count"]) == (0, 0), stats


def test_tritonclient_http_errors_are_exceptions_with_the_server_text(
        client: triton_http.InferenceServerClient) -> None:
    tensor = triton_http.InferInput("input", [1, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(X[:1])
    with pytest.raises(InferenceServerException, match="unknown model 'resnet'"):
        client.infer("resnet", [tensor])


def _png(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def test_images_are_classified_from_their_bytes_or_multipart_files(
        server: ServerProcess) -> None:
    digit = np.zeros((28, 28), np.uint8)
    digit[4:24, 12:16] = 255  # a "1"
    status, answer = call(server, "/v2/models/lenet/classify?top_k=3", _png(digit),
                          {"Content-Type": "image/png"})
    assert status == 200, answer
    (classification,) = json.loads(answer)["classifications"]
    assert len(classification["predictions"]) == 3
    probabilities = [p["probability"] for p in classification["predictions"]]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1
    boundary = "cnnserve-boundary"
    parts = b"".join(
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
        f"filename=\"{i}.png\"\r\nContent-Type: image/png\r\n\r\n".encode() + _png(digit)
        + b"\r\n" for i in range(2)) + f"--{boundary}--\r\n".encode()
    status, answer = call(server, "/v2/models/lenet/classify", parts,
                          {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200, answer
    assert len(json.loads(answer)["classifications"]) == 2
    status, answer = call(server, "/v2/models/lenet/classify", b"not an image",
                          {"Content-Type": "image/png"})
    assert status == 400 and "error" in json.loads(answer)


def _multipart(parts: list[bytes], boundary: str = "b0undary",
               headers: str = "Content-Type: image/png") -> tuple[bytes, dict[str, str]]:
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"f\"\r\n"
                    f"{headers}\r\n\r\n".encode() + part + b"\r\n" for part in parts)
    return body + f"--{boundary}--\r\n".encode(), {
        "Content-Type": f"multipart/form-data; boundary={boundary}"}


@pytest.mark.parametrize(("parts", "headers", "status", "text"), [
    ([b"x"] * 100_000, "Content-Type: image/png", 400, "at most 256 files"),
    ([b"x" * 1000], "Content-Transfer-Encoding: base64", 501, "encoded multipart"),
    ([b"x" * 1000], "Content-Encoding: gzip", 501, "encoded multipart"),
    ([b"x" * 1000], "X: " + "y" * 9000, 400, "could not be read"),
    ([b"", b""], "Content-Type: image/png", 400, "holds no image"),
], ids=["100k-parts", "base64-part", "gzip-part", "long-part-header", "empty-files"])
def test_hostile_multipart_bodies_are_refused_without_holding_the_server(
        server: ServerProcess, parts: list[bytes], headers: str, status: int, text: str
) -> None:
    body, content_type = _multipart(parts, headers=headers)
    started = time.monotonic()
    got, answer = call(server, "/v2/models/lenet/classify", body, content_type)
    assert (got, text in json.loads(answer)["error"]) == (status, True), answer
    assert time.monotonic() - started < 5  # it stops at the 257th part, not the 100,000th


def test_multipart_files_are_bounded_by_the_message_limit_in_all(
        server_factory: Callable[..., ServerProcess], served_repo: Path) -> None:
    server = server_factory(served_repo, env={"CNNSERVE_MAX_MESSAGE_BYTES": str(1 << 20)})
    body, content_type = _multipart([b"x" * 400_000] * 3)  # each part under, all over
    got, answer = call(server, "/v2/models/lenet/classify", body,
                        content_type)
    assert got == 413, answer



def test_kserve_v1_predicts_from_base64_images_and_from_tensor_rows(
        server: ServerProcess, served_repo: Path) -> None:
    import base64

    digit = np.zeros((28, 28), np.uint8)
    digit[4:24, 12:16] = 255
    status, answer = call(server, "/v1/models/lenet")
    assert status == 200 and json.loads(answer) == {"name": "lenet", "ready": True}
    body = json.dumps({"instances": [{"b64": base64.b64encode(_png(digit)).decode()}] * 2})
    status, answer = call(server, "/v1/models/lenet:predict", body.encode())
    assert status == 200, answer
    predictions = json.loads(answer)["predictions"]
    assert len(predictions) == 2 and {"label", "index", "probability"} <= set(predictions[0])
    body = json.dumps({"instances": X[:2].tolist()})
    status, answer = call(server, "/v1/models/lenet:predict", body.encode())
    assert status == 200, answer
    np.testing.assert_allclose(json.loads(answer)["predictions"],
                               direct(served_repo, "lenet", X[:2]), rtol=1e-5, atol=1e-5)
    status, answer = call(server, "/v1/models/lenet:predict", b'{"instances": [[1], [2, 3]]}')
    assert status == 400 and "error" in json.loads(answer)


def test_kserve_sdk_reads_health_and_metadata_and_infers_over_rest_and_grpc(
        server: ServerProcess, served_repo: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", X)
    done = subprocess.run(
        [sys.executable, "-m", "tests.service.kserve_sdk", f"http://127.0.0.1:{server.http_port}",
         f"127.0.0.1:{server.port}", "lenet", str(tmp_path / "x.npy")],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout)
    rest, grpc = got["rest"], got["grpc"]
    assert rest["live"] and rest["ready"] and rest["model_ready"]
    assert not rest["missing_model_ready"]
    status, text = rest["missing_model_infer"]
    assert status == 404 and "no-such-model" in text
    assert rest["metadata"]["inputs"] == [{"name": "input", "datatype": "FP32",
                                           "shape": [-1, 1, 28, 28]}]
    wanted = direct(served_repo, "lenet", X)
    for answer in (rest["infer_binary"], rest["infer_json"], grpc["infer"]):
        np.testing.assert_allclose(np.array(answer["outputs"]["logits"]), wanted,
                                   rtol=1e-5, atol=1e-5)
    assert rest["infer_binary"]["id"] == "k-1" and grpc["infer"]["id"] == "g-1"
    assert grpc["ready"] and grpc["model_ready"]


def test_health_answers_carry_the_protocols_bodies_and_a_missing_model_is_404(
        server: ServerProcess) -> None:
    assert call(server, "/v2/health/live") == (200, b'{"live":true}')
    assert call(server, "/v2/health/ready") == (200, b'{"ready":true}')
    assert call(server, "/v2/models/lenet/ready") == (200, b'{"name":"lenet","ready":true}')
    status, body = call(server, "/v2/models/lenet/versions/7/ready")
    assert (status, b"has no served version '7'" in body) == (404, True), body
    status, body = call(server, "/v2/models/nothing/ready")
    assert (status, b"unknown model 'nothing'" in body) == (404, True), body


def test_requests_the_parser_refuses_are_400_and_one_log_line_not_a_traceback_each(
        served_repo: Path, server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(served_repo)
    for _ in range(200):
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
            sock.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Probe: \x00\r\n\r\n")
            assert sock.recv(1024).split(b" ")[1] == b"400"
    wait_until(lambda: any("refused a malformed HTTP request" in line
                           for line in server.lines), 10)
    assert call(server, "/v2/models/lenet")[0] == 200
    refused = [line for line in server.lines if "malformed HTTP request" in line]
    assert len(refused) <= 2, refused  # one per interval, with a count
    assert "Traceback" not in "".join(server.lines), "".join(server.lines)[-3000:]


def test_sigterm_turns_rest_health_unready_answers_queued_requests_and_refuses_new_ones(
        served_repo: Path, server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(served_repo, "--batching", "delay",
                            "--max-queue-delay-us", "1500000")
    client = triton_http.InferenceServerClient(f"127.0.0.1:{server.http_port}", concurrency=3)
    tensor = triton_http.InferInput("input", list(X[:1].shape), "FP32")
    tensor.set_data_from_numpy(X[:1])
    queued = [client.async_infer("lenet", [tensor]) for _ in range(3)]
    wait_until(lambda: metric(server.metrics(), "cnnserve_queue_depth") == 3)
    server.proc.send_signal(15)
    wait_until(lambda: any("shutting down" in line for line in server.lines))
    status, body = call(server, "/v2/health/ready")
    assert (status, json.loads(body)) == (503, {"ready": False})
    status, body = call(server, "/v2/models/lenet/infer", BINARY_HEADER + X[:1].tobytes(),
                        {"Inference-Header-Content-Length": str(len(BINARY_HEADER))})
    assert status == 503 and "error" in json.loads(body)
    answers = [q.get_result(timeout=30).as_numpy("logits") for q in queued]
    assert all(np.array_equal(a, answers[0]) for a in answers)
    assert server.proc.wait(30) == 0
