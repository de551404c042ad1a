"""`python -m loadtests.calls`: what one request costs inside a real server, counted.

Times on a shared host are noise; counts are not. Each server (the service, then the
bare grpc.aio echo server with its aiohttp REST route) runs under `loadtests.profiled`.
For each call a single client sends requests one after another: a warm-up, a window
with the profiler off (the server's process-tree CPU time per request), then a window
with it on (the Python calls the event loop's thread made per request, which is where
every front-end, the edge, the core and the batcher run). Calls:

- `unary`: a single-image LeNet `ModelInfer`;
- `stream`: one request after another on one `ModelStreamInfer` stream;
- `rest`: a REST infer with the image as binary tensor data (Triton's extension);
- `classify`: a real digit as a PNG, to REST `/classify` (no echo counterpart; its
  decode runs in the decode pool, whose calls are not counted);
- with `--clients N`, also `unary, N clients`: unary calls from N closed-loop clients
  for `--seconds` per window (`loadtests.perf`'s client), where batches form and the
  compute runs off the loop; and `stream, N streams`: the same callers, each over a
  ModelStreamInfer stream of its own.

The report gives both counts, their ratio, CPU per request, and the functions the
service calls most per unary request, which is where a request's cost goes.
"""

from __future__ import annotations

import argparse
import http.client
import io
import os
import pstats
import queue
import signal
import sys
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from tempfile import TemporaryDirectory

import grpc
import numpy as np
import orjson

from loadtests.launch import Launched, free_ports, launch
from loadtests.perf import Inputs, Load, closed_loop, real_inputs, tree_cpu_s
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc

MODEL = "lenet"
HEADER_LENGTH = "Inference-Header-Content-Length"
WAIT_S = 30.0

Send = Callable[[], None]
Client = Generator[Send, None, None]
"""Opens a connection, yields the function that sends one request, closes."""


@dataclass
class Cost:
    call: str
    calls_per_request: float
    cpu_us_per_request: float


@dataclass
class Server:
    name: str
    program: Launched
    grpc_address: str
    http_port: int
    profile: Path


def _start(name: str, module_args: list[str], workdir: Path, http_port: int) -> Server:
    profile = workdir / f"{name}.prof"
    program = launch([sys.executable, "-m", "loadtests.profiled", str(profile), *module_args])
    return Server(name, program, program.address, http_port, profile)


def start_service(repo: Path, workdir: Path) -> Server:
    grpc_port, http_port, metrics_port, probe_port = free_ports(4)
    return _start("service", [
        "service", "--repo", str(repo), "--host", "127.0.0.1", "--port", str(grpc_port),
        "--http-port", str(http_port), "--metrics-port", str(metrics_port),
        "--probe-port", str(probe_port), "--device", "cpu", "--log-level", "WARNING"],
        workdir, http_port)


def start_echo(workdir: Path) -> Server:
    grpc_port, http_port = free_ports(2)
    return _start("echo", ["loadtests.echo", "--port", str(grpc_port),
                           "--http-port", str(http_port)], workdir, http_port)


def _signal_and_wait(server: Server, signum: int, marker: Path) -> None:
    marker.unlink(missing_ok=True)
    server.program.proc.send_signal(signum)
    deadline = time.monotonic() + WAIT_S
    while not marker.exists():
        if time.monotonic() > deadline or server.program.proc.poll() is not None:
            raise RuntimeError(f"{server.name} did not answer signal {signum}:\n"
                               + "".join(server.program.lines[-40:]))
        time.sleep(0.01)


def measure(server: Server, call: str, send: Send, requests: int, warmup: int
            ) -> tuple[Cost, pstats.Stats]:
    for _ in range(warmup):
        send()
    pid = server.program.proc.pid
    cpu = tree_cpu_s(pid)
    for _ in range(requests):
        send()
    cpu = tree_cpu_s(pid) - cpu
    _signal_and_wait(server, signal.SIGUSR1, Path(f"{server.profile}.on"))
    for _ in range(requests):
        send()
    _signal_and_wait(server, signal.SIGUSR2, Path(f"{server.profile}.done"))
    stats = pstats.Stats(str(server.profile))
    return Cost(call, stats.total_calls / requests, cpu / requests * 1e6), stats  # type: ignore[attr-defined]


def measure_under_load(server: Server, clients: int, seconds: float, inputs: Inputs,
                       streaming: bool = False) -> Cost:
    """`measure`, with `clients` callers at once for `seconds` per window (`streaming`:
    each over a ModelStreamInfer stream of its own)."""
    load = Load(MODEL, clients, 1, seconds, streaming=streaming)
    closed_loop(server.grpc_address, inputs,
                Load(MODEL, clients, 1, min(seconds, 1.0), streaming=streaming))
    pid = server.program.proc.pid
    cpu = tree_cpu_s(pid)
    unprofiled = closed_loop(server.grpc_address, inputs, load)
    cpu = tree_cpu_s(pid) - cpu
    _signal_and_wait(server, signal.SIGUSR1, Path(f"{server.profile}.on"))
    profiled = closed_loop(server.grpc_address, inputs, load)
    _signal_and_wait(server, signal.SIGUSR2, Path(f"{server.profile}.done"))
    stats = pstats.Stats(str(server.profile))
    if profiled.errors or unprofiled.errors or not profiled.requests:
        raise RuntimeError(f"{server.name}: {profiled.errors + unprofiled.errors} of the "
                           f"requests under load failed")
    return Cost(f"stream, {clients} streams" if streaming else f"unary, {clients} clients",
                stats.total_calls / profiled.requests,  # type: ignore[attr-defined]
                cpu / max(unprofiled.requests, 1) * 1e6)


def _infer_request(name: str, image: np.ndarray) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=MODEL, inputs=[pb.ModelInferRequest.InferInputTensor(
            name=name, datatype="FP32", shape=[1, *image.shape])],
        raw_input_contents=[image.astype(np.float32).tobytes()])


def unary(address: str, request: pb.ModelInferRequest) -> Client:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        def send() -> None:
            stub.ModelInfer(request, timeout=10)

        yield send


def stream(address: str, request: pb.ModelInferRequest) -> Client:
    outbox: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        answers = stub.ModelStreamInfer(iter(outbox.get, None), timeout=600)

        def send() -> None:
            outbox.put(request)
            answer = next(answers)
            if answer.error_message:
                raise RuntimeError(answer.error_message)

        try:
            yield send
        finally:
            outbox.put(None)
            for _ in answers:
                pass


def rest(port: int, name: str, image: np.ndarray) -> Client:
    data = image.astype(np.float32).tobytes()
    header = orjson.dumps({"inputs": [{"name": name, "datatype": "FP32",
                                       "shape": [1, *image.shape],
                                       "parameters": {"binary_data_size": len(data)}}],
                           "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]})
    body = header + data
    headers = {HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def send() -> None:
        connection.request("POST", f"/v2/models/{MODEL}/infer", body, headers)
        answer = connection.getresponse()
        answer.read()
        if answer.status != 200:
            raise RuntimeError(f"REST infer answered {answer.status}")

    try:
        yield send
    finally:
        connection.close()


def classify(port: int, png: bytes) -> Client:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def send() -> None:
        connection.request("POST", f"/v2/models/{MODEL}/classify", png,
                           {"Content-Type": "image/png"})
        answer = connection.getresponse()
        answer.read()
        if answer.status != 200:
            raise RuntimeError(f"classify answered {answer.status}")

    try:
        yield send
    finally:
        connection.close()


def digit_png() -> bytes:
    from PIL import Image

    from contract.datasets import load_dataset

    digit = load_dataset("mnist5k").test.images[0]
    pixels = np.asarray(digit).reshape(28, 28)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def run(repo: Path, requests: int, warmup: int, clients: int = 0, seconds: float = 5.0
        ) -> tuple[list[tuple[str, Cost, Cost | None]], pstats.Stats]:
    inputs = real_inputs(repo, MODEL)
    image = inputs.images[0]
    request = _infer_request(inputs.name, image)
    png = digit_png()
    results: dict[str, dict[str, Cost]] = {"service": {}, "echo": {}}
    unary_stats: pstats.Stats | None = None
    with TemporaryDirectory() as tmp:
        for name in ("service", "echo"):
            server = start_service(repo, Path(tmp)) if name == "service" else \
                start_echo(Path(tmp))
            try:
                calls: dict[str, Callable[[], Client]] = {
                    "unary": partial(unary, server.grpc_address, request),
                    "stream": partial(stream, server.grpc_address, request),
                    "rest": partial(rest, server.http_port, inputs.name, image)}
                if name == "service":
                    calls["classify"] = partial(classify, server.http_port, png)
                for call, client in calls.items():
                    opened = client()
                    send = next(opened)
                    try:
                        cost, stats = measure(server, call, send, requests, warmup)
                    finally:
                        opened.close()
                    results[name][call] = cost
                    if name == "service" and call == "unary":
                        unary_stats = stats
                for streaming in (False, True) if clients else ():
                    cost = measure_under_load(server, clients, seconds, inputs, streaming)
                    results[name][cost.call] = cost
            finally:
                server.program.stop()
    assert unary_stats is not None
    return [(call, cost, results["echo"].get(call))
            for call, cost in results["service"].items()], unary_stats


def _ratio(ours: float, theirs: float) -> str:
    """A ratio, or '-' where the reference measured nothing (CPU below the clock's tick)."""
    return f"{ours / theirs:.2f}x" if theirs > 0 else "-"


def report(rows: list[tuple[str, Cost, Cost | None]], stats: pstats.Stats, requests: int,
           top: int = 25) -> str:
    lines = [f"Python calls per request on the event loop's thread and server CPU per request "
             f"(process tree), one client, {requests} requests per window (under load: "
             "the requests answered in each window).", "",
             "| call | service calls | echo calls | ratio | service CPU (us) | echo CPU (us) "
             "| ratio |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for call, ours, echo in rows:
        if echo is None:
            lines.append(f"| {call} | {ours.calls_per_request:.1f} | - | - | "
                         f"{ours.cpu_us_per_request:.0f} | - | - |")
            continue
        lines.append(
            f"| {call} | {ours.calls_per_request:.1f} | {echo.calls_per_request:.1f} | "
            f"{_ratio(ours.calls_per_request, echo.calls_per_request)} | "
            f"{ours.cpu_us_per_request:.0f} | {echo.cpu_us_per_request:.0f} | "
            f"{_ratio(ours.cpu_us_per_request, echo.cpu_us_per_request)} |")
    lines += ["", f"The service's most frequent calls per unary request (top {top}):", "",
              "| calls per request | function |", "| --- | --- |"]
    entries = stats.stats  # type: ignore[attr-defined]
    ranked = sorted(entries.items(), key=lambda item: item[1][1], reverse=True)[:top]
    for (file, line, function), (_, total, *_rest) in ranked:
        where = f"{Path(file).parent.name}/{Path(file).name}:{line}" if line else file
        lines.append(f"| {total / requests:.1f} | `{function}` ({where}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.calls", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", type=Path, default=Path("runs/demo/model_repository"),
                   help="a model repository with a model named lenet (make demo's)")
    p.add_argument("--requests", type=int, default=2000, help="requests per window")
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--clients", type=int, default=0,
                   help="also count calls from this many clients at once, unary and over "
                        "streams")
    p.add_argument("--seconds", type=float, default=5.0,
                   help="each window under load (with --clients)")
    p.add_argument("--out", type=Path, help="also write the report to this file")
    args = p.parse_args(argv)
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    rows, stats = run(args.repo, args.requests, args.warmup, args.clients, args.seconds)
    text = report(rows, stats, args.requests)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
