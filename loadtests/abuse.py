"""`python -m loadtests.abuse`: attack a real server on loopback and report what it withstood.

Each attack gets a fresh server with default settings. While the attack runs (in a
process of its own, bounded in time and count), a prober times Health/Check and
ServerLive on the probe port (what Kubernetes and compose call) and Health/Check on the
serving port, and well-behaved clients keep calling ModelInfer over gRPC and over REST
(binary tensors, on the HTTP port). The report says, per attack: probe latency on each,
what the well-behaved clients got, whether answers afterwards are right, peak RSS over
the idle baseline, what the attacker saw and what /metrics counted, and how long a
SIGTERM sent during the attack took to exit.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import http.client
import io
import itertools
import json
import multiprocessing as mp
import re
import select
import socket
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loadtests.launch import ROOT, Launched, free_ports, launch
from protos import classifier_pb2 as cpb
from protos import classifier_pb2_grpc as cpb_grpc
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc

MiB = 1 << 20
PROBE_LIMIT_S = 0.1
GRACE_S = 10.0
INFER = "/inference.GRPCInferenceService/ModelInfer"
WATCH = "/grpc.health.v1.Health/Watch"
BURST_CONNECTIONS = 10
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


@dataclass(frozen=True)
class Scale:
    seconds: float
    """How long each attack runs while it is measured."""
    streams: int
    connections: int
    workers: int
    """Concurrent calls of the attacks made of well-formed calls."""
    half_open: int


SCALES = {"full": Scale(seconds=12, streams=2100, connections=9, workers=6, half_open=300),
          "quick": Scale(seconds=3, streams=300, connections=2, workers=3, half_open=40)}


# ---- what an attacker sends ---------------------------------------------------------------

def grpc_frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


def infer_request(model: str, shape: tuple[int, ...], fill: float = 0.5) -> pb.ModelInferRequest:
    data = np.full(shape, fill, "<f4")
    return pb.ModelInferRequest(model_name=model, inputs=[pb.ModelInferRequest.InferInputTensor(
        name="input", datatype="FP32", shape=list(shape))], raw_input_contents=[data.tobytes()])


def raw_h2(port: int, streams: int, connections: int, path: str, message: bytes | None,
           window: int | None, stop: Any, seconds: float) -> Counter[str]:
    """Hold `streams` HTTP/2 streams open over `connections`, re-opening those the server
    ends. `message` None: headers only, never a body. `window` 0: never read an answer."""
    import h2.config
    import h2.connection
    import h2.events
    import h2.exceptions
    import h2.settings

    seen: Counter[str] = Counter()
    conns: list[tuple[socket.socket, Any]] = []
    for _ in range(connections):
        sock = socket.create_connection(("127.0.0.1", port))
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        if window is not None:
            conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        sock.sendall(conn.data_to_send())
        conns.append((sock, conn))
    headers = [(":method", "POST"), (":scheme", "http"), (":path", path),
               (":authority", f"127.0.0.1:{port}"), ("content-type", "application/grpc"),
               ("te", "trailers")]
    per_conn = -(-streams // connections)
    end = time.monotonic() + seconds
    while not stop.is_set() and time.monotonic() < end:
        for sock, conn in conns:
            while conn.open_outbound_streams < min(per_conn,
                                                   conn.remote_settings.max_concurrent_streams):
                if message is not None and conn.outbound_flow_control_window < len(message) + 5:
                    break  # the server has not read what was sent yet
                sid = conn.get_next_available_stream_id()
                conn.send_headers(sid, headers)
                if message is not None:
                    conn.send_data(sid, grpc_frame(message), end_stream=True)
            sock.sendall(conn.data_to_send())
        ready, _, _ = select.select([s for s, _ in conns], [], [], 0.05)
        for sock, conn in conns:
            if sock not in ready:
                continue
            data = sock.recv(1 << 16)
            try:
                events = conn.receive_data(data) if data else None
            except h2.exceptions.ProtocolError:  # frames after the server's GOAWAY
                events = None
            if events is None:
                seen["connection closed"] += 1
                stop.set()
                break
            for event in events:
                if isinstance(event, h2.events.TrailersReceived | h2.events.ResponseReceived):
                    status = dict(event.headers).get(b"grpc-status")
                    if status is not None:
                        seen[_CODE_NAMES.get(int(status), f"status {int(status)}")] += 1
                elif isinstance(event, h2.events.StreamReset):
                    seen["stream reset"] += 1
                elif isinstance(event, h2.events.DataReceived) and window != 0:
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            sock.sendall(conn.data_to_send())
    for sock, _ in conns:
        sock.close()
    return seen




class HttpStatus(Exception):  # noqa: N818 - an outcome that `repeat` counts, not an error
    """What an HTTP attack call got, counted by `repeat` as a gRPC call's status is."""


def repeat(calls: Callable[[], object], workers: int, stop: Any, seconds: float) -> Counter[str]:
    """Run `calls` from `workers` threads until stopped; count the statuses they got."""
    seen: Counter[str] = Counter()
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def loop() -> None:
        while not stop.is_set() and time.monotonic() < end:
            try:
                calls()
                status = "OK"
            except grpc.RpcError as exc:
                status = exc.code().name
                details = exc.details() or ""
                if len(details) > 500 or " at 0x" in details:
                    status += " (bad error text)"
            except HttpStatus as outcome:
                status = str(outcome)
            with lock:
                seen[status] += 1

    with ThreadPoolExecutor(workers) as pool:
        for _ in range(workers):
            pool.submit(loop)
    return seen


def _image(fmt: str, size: int, mode: str = "L", noise: bool = False, **kw: Any) -> bytes:
    from PIL import Image

    if noise:
        rng = np.random.default_rng(0)
        image = Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8))
    else:
        image = Image.new(mode, (size, size))
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


# ---- the attacks, each a function run in a process of its own ----------------------------

def attack_headers_only(port: int, scale: Scale, stop: Any) -> Counter[str]:
    """HTTP/2 streams that send headers and never a request body."""
    return raw_h2(port, scale.streams, scale.connections, INFER, None, None, stop, scale.seconds)


def attack_health_watch(port: int, scale: Scale, stop: Any) -> Counter[str]:
    """Health/Watch streams (open to everyone), held open."""
    message = health_pb2.HealthCheckRequest(service="").SerializeToString()
    return raw_h2(port, scale.streams, scale.connections, WATCH, message, None, stop,
                  scale.seconds)


def attack_unread_answers(port: int, scale: Scale, stop: Any) -> Counter[str]:
    """Complete requests from a client whose receive window is 0: it never reads an answer."""
    message = infer_request("lenet", (4, 1, 28, 28)).SerializeToString()
    return raw_h2(port, scale.streams, scale.connections, INFER, message, 0, stop, scale.seconds)


def attack_stream_burst(port: int, scale: Scale, stop: Any) -> Counter[str]:
    """Complete requests on every stream 10 connections may open (2,560), answers read,
    again as each ends: more calls at once than gRPC core holds for Python by default."""
    message = infer_request("lenet", (1, 1, 28, 28)).SerializeToString()
    return raw_h2(port, BURST_CONNECTIONS * 256, BURST_CONNECTIONS, INFER, message, None, stop,
                  scale.seconds)


def attack_decode_cpu(port: int, scale: Scale, stop: Any) -> Counter[str]:
    """Images that are small to send and slow to decode, with 0.2 s deadlines."""
    webp = _image("WEBP", 4096, lossless=True)
    png1 = _image("PNG", 4096, mode="1")
    stub = cpb_grpc.ClassifierStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    requests = [cpb.PredictRequest(model="lenet", images=[cpb.Image(encoded=webp)] * 32),
                cpb.PredictRequest(model="lenet", images=[cpb.Image(encoded=png1)] * 32),
                cpb.PredictRequest(model="lenet", images=[cpb.Image(encoded=webp)])]
    cycle = itertools.cycle(requests)
    return repeat(lambda: stub.Predict(next(cycle), timeout=0.2), scale.workers, stop,
                  scale.seconds)


def attack_gzip_expansion(port: int, scale: Scale, stop: Any) -> Counter[str]:
    """ModelInfer of ~63 MiB of zeros, gzip-compressed to ~64 KB on the wire."""
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", compression=grpc.Compression.Gzip,
                                    options=[("grpc.max_send_message_length", 128 * MiB)])
    call = channel.unary_unary(INFER, request_serializer=lambda b: b,
                               response_deserializer=lambda b: b)
    message = infer_request("lenet", (21000, 1, 28, 28), fill=0.0).SerializeToString()
    return repeat(lambda: call(message, timeout=20), scale.workers, stop, scale.seconds)


def attack_big_images(port: int, scale: Scale, stop: Any) -> Counter[str]:
    """~300 KB images that decode to 16 Mpx each."""
    jpeg = _image("JPEG", 4096, noise=False, quality=95)
    png = _image("PNG", 4096, noise=False)
    stub = cpb_grpc.ClassifierStub(grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 * MiB)]))
    request = cpb.PredictRequest(model="lenet", images=[cpb.Image(encoded=jpeg),
                                                        cpb.Image(encoded=png)] * 2)
    return repeat(lambda: stub.Predict(request, timeout=20), scale.workers, stop, scale.seconds)


def attack_protocol_errors(port: int, scale: Scale, stop: Any) -> Counter[str]:
    """Undecodable messages, 16 KB names, NaN tensors, images that are not images."""
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    raw = channel.unary_unary(INFER, request_serializer=lambda b: b,
                              response_deserializer=lambda b: b)
    oip = pb_grpc.GRPCInferenceServiceStub(channel)
    classifier = cpb_grpc.ClassifierStub(channel)
    nan = cpb.Image(tensor=cpb.Tensor(shape=[1, 28, 28], data=[float("nan")] * 784))
    calls: list[Callable[[], object]] = [
        lambda: raw(b"\xff\xff\xff\xff garbage", timeout=5),
        lambda: oip.ModelInfer(infer_request("x" * 16384, (1, 1, 28, 28)), timeout=5),
        lambda: classifier.Predict(cpb.PredictRequest(model="lenet", images=[nan]), timeout=5),
        lambda: classifier.Predict(cpb.PredictRequest(
            model="lenet", images=[cpb.Image(encoded=b"GIF89a" + b"\x00" * 64)]), timeout=5)]
    cycle = itertools.cycle(calls)
    return repeat(lambda: next(cycle)(), scale.workers, stop, scale.seconds)


def attack_metrics_port(port: int, scale: Scale, stop: Any) -> Counter[str]:
    """Half-open requests to the metrics port (its number is passed as `port`), held open."""
    seen: Counter[str] = Counter()
    socks = []
    for _ in range(scale.half_open):
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=2)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never the blank line
            socks.append(sock)
            seen["held open"] += 1
        except OSError:
            seen["refused"] += 1
    for path in ("/", "/v2/health/ready", "/metrics/../x"):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5)
            seen[f"{path}: 200"] += 1
        except urllib.error.HTTPError as exc:
            seen[f"{path}: {exc.code}"] += 1
        except OSError:
            seen[f"{path}: no answer"] += 1
    stop.wait(scale.seconds)
    for sock in socks:
        sock.close()
    return seen


def http_exchange(port: int, request: bytes, timeout: float = 10) -> str:
    """Send one raw HTTP/1.1 request; what came back: `HTTP 413`, or what happened."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):  # answered and closed before the body was sent:
            sock.sendall(request)             # the answer is still there to read
        try:
            head = sock.recv(64)
        except OSError as exc:
            return type(exc).__name__
    match = re.match(rb"HTTP/1\.1 (\d{3})", head)
    return f"HTTP {int(match[1])}" if match else "no answer"


def _post(path: str, body: bytes, *headers: str, length: int | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close",
             f"Content-Length: {len(body) if length is None else length}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def attack_rest_bodies(port: int, scale: Scale, stop: Any) -> Counter[str]:
    """The REST port (its number is passed as `port`): 32 MB JSON tensors (about half a
    second of parsing each), 10 GB declared bodies, nesting bombs, 100,000-part multipart
    bodies, binary headers that lie, gzip bodies."""
    infer = "/v2/models/lenet/infer"
    values = 8_000_000
    big_json = (b'{"inputs":[{"name":"input","datatype":"FP32","shape":[%d],"data":[' % values
                + b"0.5," * (values - 1) + b"0.5]}]}")
    parts = b"".join(b"--b\r\nContent-Disposition: form-data; name=\"f\"\r\n\r\nx\r\n"
                     for _ in range(100_000)) + b"--b--\r\n"
    nested = b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1],"data":' + \
        b"[" * 100_000 + b"]" * 100_000 + b"}]}"
    requests = [
        _post(infer, big_json, "Content-Type: application/json"),
        _post(infer, b"", length=10**10),
        _post(infer, nested),
        _post("/v2/models/lenet/classify", parts, "Content-Type: multipart/form-data; boundary=b"),
        _post(infer, b'{"inputs":[]}' + b"\0" * 100, "Inference-Header-Content-Length: 99999"),
        _post(infer, gzip.compress(b"[" + b"0," * 4_000_000 + b"0]"), "Content-Encoding: gzip"),
    ]
    cycle = itertools.cycle(requests)
    lock = threading.Lock()

    def send() -> None:
        with lock:
            request = next(cycle)
        raise HttpStatus(http_exchange(port, request))

    return repeat(send, scale.workers, stop, scale.seconds)


def attack_rest_slow(port: int, scale: Scale, stop: Any) -> Counter[str]:
    """The REST port: connections that trickle a byte a second into their headers, into a
    body, or into the next request after a first one was answered."""
    starts = [b"GET /v2/models/lenet HTTP/1.1\r\nHost: x\r\n",
              _post("/v2/models/lenet/infer", b"", length=1_000_000),
              b"GET /v2/models/lenet HTTP/1.1\r\nHost: x\r\n\r\nGET /v2 HTTP/1.1\r\n"]
    seen: Counter[str] = Counter()
    held: list[tuple[socket.socket, str]] = []
    for i in range(scale.half_open):
        kind = ("headers", "body", "next request")[i % 3]
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=2)
            sock.sendall(starts[i % 3])
            sock.setblocking(False)
            held.append((sock, kind))
        except OSError:
            seen["refused"] += 1
    end = time.monotonic() + scale.seconds
    while held and not stop.is_set() and time.monotonic() < end:
        stop.wait(1.0)
        for sock, kind in list(held):
            try:
                answer = sock.recv(1 << 16)
                closed = not answer or b"Connection: close" in answer or answer.count(
                    b"HTTP/1.1") > 1
                if answer.startswith(b"HTTP/1.1"):
                    seen[f"{kind}: answered {answer[9:12].decode()}"] += 1
            except BlockingIOError:
                closed = False
            except OSError:
                closed = True
            if not closed:
                try:
                    sock.send(b"x")
                except OSError:
                    closed = True
            if closed:
                seen[f"{kind}: closed by the server"] += 1
                sock.close()
                held.remove((sock, kind))
    seen.update(f"{kind}: still open" for _, kind in held)
    for sock, _ in held:
        sock.close()
    return seen


ATTACKS: dict[str, Callable[[int, Scale, Any], Counter[str]]] = {
    "headers-only": attack_headers_only,
    "health-watch": attack_health_watch,
    "unread-answers": attack_unread_answers,
    "stream-burst": attack_stream_burst,
    "decode-cpu": attack_decode_cpu,
    "gzip-expansion": attack_gzip_expansion,
    "big-images": attack_big_images,
    "protocol-errors": attack_protocol_errors,
    "metrics-port": attack_metrics_port,
    "rest-bodies": attack_rest_bodies,
    "rest-slow": attack_rest_slow,
}


def _attack_process(name: str, port: int, scale: Scale, stop: Any, results: Any) -> None:
    results.put(dict(ATTACKS[name](port, scale, stop)))


# ---- the harness ---------------------------------------------------------------------------

@dataclass
class Watch:
    """What the prober, the well-behaved client and the RSS sampler saw."""

    probe_s: list[float] = field(default_factory=list)
    serving_port_probe_s: list[float] = field(default_factory=list)
    probe_failures: Counter[str] = field(default_factory=Counter)
    good: Counter[str] = field(default_factory=Counter)
    good_rest: Counter[str] = field(default_factory=Counter)
    wrong_answers: int = 0
    scrape_s: list[float] = field(default_factory=list)
    peak_rss: int = 0


@dataclass
class Result:
    attack: str
    probes: int
    probe_p50_ms: float
    probe_max_ms: float
    probe_failures: dict[str, int]
    serving_port_probe_p50_ms: float
    serving_port_probe_max_ms: float
    good: dict[str, int]
    good_rest: dict[str, int]
    """What a well-behaved REST client (binary infer, keep-alive) got on the HTTP port."""
    afterwards_ok: bool
    peak_rss_mib: float
    attacker: dict[str, int]
    counted: dict[str, int]
    sigterm_code: int | None
    sigterm_s: float
    scrape_max_ms: float

    @property
    def passed(self) -> bool:
        return (self.probe_max_ms <= PROBE_LIMIT_S * 1000 and not self.probe_failures
                and set(self.good) <= {"OK", "RESOURCE_EXHAUSTED"}
                and set(self.good_rest) <= {"OK", "RESOURCE_EXHAUSTED"} and self.afterwards_ok
                and self.sigterm_code == 0 and self.sigterm_s <= GRACE_S + 1
                and not any("bad error text" in k for k in self.attacker))


def _server(repo: Path, env: dict[str, str]) -> tuple[Launched, int, int, int]:
    # Picked together, the gRPC port too: a port 0 could land on one picked for REST.
    grpc_port, metrics_port, probe_port, http_port = free_ports(4)
    server = launch([sys.executable, "-m", "service", "--repo", str(repo),
                     "--port", str(grpc_port),
                     "--metrics-port", str(metrics_port), "--probe-port", str(probe_port),
                     "--http-port", str(http_port), "--device", "cpu"], env=env)
    return server, metrics_port, probe_port, http_port


def _counted(metrics_port: int) -> Counter[str]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10
                                  ).read().decode()
    counted: Counter[str] = Counter()
    for match in re.finditer(r'^cnnserve_requests_total\{(.*)\} (\S+)$', text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match[1]))
        counted[f"{labels['api']} {labels['code']}"] += int(float(match[2]))
    return counted


def _watch(address: str, metrics_port: int, probe_port: int, http_port: int, pid: int,
           reference: np.ndarray, stop: threading.Event, scrape: bool) -> Watch:
    seen = Watch()
    proc = psutil.Process(pid)
    probe_channel = grpc.insecure_channel(f"127.0.0.1:{probe_port}")
    health = health_pb2_grpc.HealthStub(probe_channel)
    oip_probe = pb_grpc.GRPCInferenceServiceStub(probe_channel)
    serving_health = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    good = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address))
    request = infer_request("lenet", (1, 1, 28, 28))

    def check(stub: health_pb2_grpc.HealthStub) -> None:
        answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
        if answer.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError("NOT_SERVING")

    def probe() -> None:
        while not stop.is_set():
            for call, times in ((lambda: check(health), seen.probe_s),
                                (lambda: oip_probe.ServerLive(pb.ServerLiveRequest(),
                                                              timeout=2), seen.probe_s),
                                (lambda: check(serving_health), seen.serving_port_probe_s)):
                started = time.perf_counter()
                try:
                    call()
                    times.append(time.perf_counter() - started)
                except grpc.RpcError as exc:
                    seen.probe_failures[exc.code().name] += 1
                except RuntimeError as exc:
                    seen.probe_failures[str(exc)] += 1
            if scrape:
                started = time.perf_counter()
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                           timeout=5).read()
                    seen.scrape_s.append(time.perf_counter() - started)
                except OSError:
                    seen.probe_failures["metrics scrape"] += 1
            stop.wait(0.05)

    def client() -> None:
        while not stop.is_set():
            try:
                out = good.ModelInfer(request, timeout=5)
                logits = np.frombuffer(out.raw_output_contents[0], "<f4")
                seen.good["OK"] += 1
                if not np.allclose(logits, reference, atol=1e-4):
                    seen.wrong_answers += 1
            except grpc.RpcError as exc:
                seen.good[exc.code().name] += 1
                stop.wait(0.01)

    def rest_client() -> None:
        header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32",
                                         "shape": [1, 1, 28, 28],
                                         "parameters": {"binary_data_size": 3136}}],
                             "outputs": [{"name": "logits",
                                          "parameters": {"binary_data": True}}]}).encode()
        body = header + np.full((1, 1, 28, 28), 0.5, "<f4").tobytes()
        headers = {"Inference-Header-Content-Length": str(len(header)),
                   "Content-Type": "application/octet-stream"}
        conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=5)
        while not stop.is_set():
            try:
                conn.request("POST", "/v2/models/lenet/infer", body, headers)
                answer = conn.getresponse()
                data = answer.read()
            except (OSError, http.client.HTTPException) as exc:
                seen.good_rest[type(exc).__name__] += 1
                conn.close()
                stop.wait(0.01)
                continue
            if answer.status != 200:
                status = {429: "RESOURCE_EXHAUSTED"}.get(answer.status, f"HTTP {answer.status}")
                seen.good_rest[status] += 1
                stop.wait(0.01)
                continue
            seen.good_rest["OK"] += 1
            length = int(answer.getheader("Inference-Header-Content-Length", "0"))
            if not np.allclose(np.frombuffer(data[length:], "<f4"), reference, atol=1e-4):
                seen.wrong_answers += 1

    def rss() -> None:
        while not stop.is_set():
            try:
                seen.peak_rss = max(seen.peak_rss, proc.memory_info().rss)
            except psutil.Error:
                return
            stop.wait(0.02)

    threads = [threading.Thread(target=f, daemon=True)
               for f in (probe, client, rest_client, rss)]
    for t in threads:
        t.start()
    stop.wait()
    for t in threads:
        t.join(10)
    return seen


def run_attack(name: str, repo: Path, scale: Scale, env: dict[str, str]) -> Result:
    ctx = mp.get_context("spawn")
    server, metrics_port, probe_port, http_port = _server(repo, env)
    try:
        good = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.address))
        request = infer_request("lenet", (1, 1, 28, 28))
        reference = np.frombuffer(good.ModelInfer(request, timeout=30).raw_output_contents[0],
                                  "<f4").copy()
        for _ in range(20):
            good.ModelInfer(request, timeout=30)
        baseline_rss = psutil.Process(server.proc.pid).memory_info().rss
        before = _counted(metrics_port)

        stop_watch = threading.Event()
        watched: list[Watch] = []
        watcher = threading.Thread(target=lambda: watched.append(_watch(
            server.address, metrics_port, probe_port, http_port, server.proc.pid, reference,
            stop_watch, scrape=name == "metrics-port")))
        watcher.start()
        stop, results = ctx.Event(), ctx.Queue()
        target = {"metrics-port": metrics_port, "rest-bodies": http_port,
                  "rest-slow": http_port}.get(name, server.port)
        attacker = ctx.Process(target=_attack_process, args=(name, target, scale, stop, results))
        attacker.start()
        try:
            seen_by_attacker = results.get(timeout=scale.seconds + 60)
        except Exception:  # noqa: BLE001 - reported as what the attacker saw
            seen_by_attacker = {"attacker crashed": 1}
        attacker.join(10)
        if attacker.is_alive():
            attacker.kill()
        stop_watch.set()
        watcher.join(30)
        watch = watched[0] if watched else Watch()

        afterwards = [np.frombuffer(good.ModelInfer(request, timeout=10).raw_output_contents[0],
                                    "<f4") for _ in range(20)]
        afterwards_ok = watch.wrong_answers == 0 and all(
            np.allclose(a, reference, atol=1e-4) for a in afterwards)
        after = _counted(metrics_port)
        counted = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}

        # SIGTERM while the same attack runs again.
        stop2, results2 = ctx.Event(), ctx.Queue()
        again = ctx.Process(target=_attack_process,
                            args=(name, target, Scale(**{**scale.__dict__, "seconds": 30}),
                                  stop2, results2))
        again.start()
        time.sleep(min(2.0, scale.seconds))
        started = time.monotonic()
        try:
            code: int | None = server.terminate(timeout=GRACE_S + 20)
        except Exception:  # noqa: BLE001 - a server that did not exit is a failure to report
            code = None
        exit_s = time.monotonic() - started
        stop2.set()
        again.join(10)
        if again.is_alive():
            again.kill()
    finally:
        server.stop()
    (probe_p50, probe_max), (serving_p50, serving_max) = (
        _p50_max_ms(watch.probe_s), _p50_max_ms(watch.serving_port_probe_s))
    return Result(
        attack=name, probes=len(watch.probe_s), probe_p50_ms=probe_p50,
        probe_max_ms=probe_max, probe_failures=dict(watch.probe_failures),
        serving_port_probe_p50_ms=serving_p50, serving_port_probe_max_ms=serving_max,
        good=dict(watch.good), good_rest=dict(watch.good_rest),
        afterwards_ok=afterwards_ok,
        peak_rss_mib=max(watch.peak_rss - baseline_rss, 0) / MiB,
        attacker=seen_by_attacker, counted=counted, sigterm_code=code, sigterm_s=exit_s,
        scrape_max_ms=max(watch.scrape_s, default=0.0) * 1000)


def _p50_max_ms(seconds: list[float]) -> tuple[float, float]:
    if not seconds:
        return float("nan"), float("nan")
    return statistics.median(seconds) * 1000, max(seconds) * 1000


def table(results: list[Result], scale: str) -> str:
    lines = [f"Scale `{scale}`; default settings; one server process; probes every 50 ms "
             "(Health/Check and ServerLive on the probe port, limit "
             f"{PROBE_LIMIT_S * 1000:.0f} ms; Health/Check on the serving port, no limit).",
             "",
             "| attack | probe port p50 / max (ms) | serving port p50 / max (ms) | well-behaved "
             "client, gRPC | well-behaved client, REST | afterwards | peak RSS over idle | "
             "attacker saw | /metrics counted (api code) | SIGTERM | pass |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        fails = f", failed {r.probe_failures}" if r.probe_failures else ""
        scrape = f"; scrapes max {r.scrape_max_ms:.0f} ms" if r.scrape_max_ms else ""
        lines.append(
            f"| {r.attack} | {r.probe_p50_ms:.1f} / {r.probe_max_ms:.1f} ({r.probes}){fails}"
            f"{scrape} | {r.serving_port_probe_p50_ms:.1f} / {r.serving_port_probe_max_ms:.1f} | "
            f"{_fmt(r.good)} | {_fmt(r.good_rest)} | {'correct' if r.afterwards_ok else 'WRONG'} | "
            f"+{r.peak_rss_mib:.0f} MiB | {_fmt(r.attacker)} | {_fmt(r.counted)} | "
            f"exit {r.sigterm_code} in {r.sigterm_s:.1f} s | {'yes' if r.passed else 'NO'} |")
    return "\n".join(lines)


def _fmt(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) or "-"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.abuse", description=__doc__)
    p.add_argument("--repo", type=Path, default=ROOT / "runs/demo/model_repository",
                   help="a model repository with a model named lenet (make demo's)")
    p.add_argument("--scale", choices=sorted(SCALES), default="full")
    p.add_argument("--attack", nargs="*", choices=sorted(ATTACKS), help="default: all")
    p.add_argument("--out", type=Path, help="also write the table to this file")
    p.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    args = p.parse_args(argv)
    results = []
    env: dict[str, str] = {}
    for name in args.attack or list(ATTACKS):
        print(f"{name}: attacking for {SCALES[args.scale].seconds:g}s ...", flush=True)
        results.append(run_attack(name, args.repo, SCALES[args.scale], env))
    report = table(results, args.scale)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")
    if args.json:
        args.json.write_text(json.dumps([{**asdict(r), "passed": r.passed} for r in results]))
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
