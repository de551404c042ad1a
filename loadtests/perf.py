"""Closed-loop load against one server, its server-side CPU accounted: the benchmark's and
the peers' shared measuring tool.

Two clients, each sending the same preprocessed test digits (real inputs: some servers
turn NaN outputs of noise into nulls): perf_analyzer, Triton's C++ load generator, for
servers that answer Triton's ModelConfig (this service, the echo server, Triton); and a
lean asyncio gRPC client, pre-serialised requests and unparsed answers, for every server
that speaks the Open Inference Protocol (MLServer answers no ModelConfig). Server CPU per
request is the CPU time of the server's process tree over the run, over its requests;
client CPU per request the load generator's own. On a host that runs both, their sum
bounds what any server could answer: cores / (server + client CPU per request).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import functools
import json
import os
import resource
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import numpy as np

from contract.datasets import load_dataset
from contract.preprocessing import resize_images, to_input
from contract.repository import latest_model_file, read_onnx_metadata
from loadtests.launch import ROOT

PERF_ANALYZER = ROOT / "loadtests" / "perf_analyzer.sh"
IMAGES = 256
"""Distinct test digits cycled through by each client."""
_INFER = "/inference.GRPCInferenceService/ModelInfer"
_STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
_STREAM_ERROR = b"\n"
"""A ModelStreamInferResponse whose first field is `error_message` (field 1, a string):
protobuf writes fields in number order, so an answer that starts with its tag failed."""
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def perf_analyzer_installed() -> bool:
    return (ROOT / ".venv-perf-analyzer" / "bin" / "perf_analyzer").exists()


@dataclass(frozen=True)
class Load:
    model: str
    concurrency: int
    images_per_request: int
    seconds: float
    version: str = "1"
    """Named to perf_analyzer, which otherwise guesses it from the statistics."""
    connection_each: bool = False
    """perf_analyzer gives each caller a connection of its own (it shares one among a few
    by default), so the kernel spreads them over a server's `--workers` processes."""
    streaming: bool = False
    """Each caller sends its requests over one ModelStreamInfer stream: gRPC's per-call
    work (a call set up and torn down for each request) is paid once."""


@dataclass(frozen=True)
class Measured:
    client: str
    requests: int
    errors: int
    requests_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    server_cpu_us: float
    """Server CPU time (its whole process tree) per answered request; nan if not known."""
    images_per_request: int = 1
    client_cpu_us: float = float("nan")
    """The load generator's CPU time per answered request."""

    @property
    def images_per_s(self) -> float:
        return self.requests_per_s * self.images_per_request


@dataclass(frozen=True)
class Inputs:
    name: str
    images: np.ndarray
    """Preprocessed test digits, float32 (IMAGES, C, H, W)."""


@functools.cache
def real_inputs(repo: Path, model: str) -> Inputs:
    """Held-out mnist5k digits preprocessed as `model`'s metadata says (name, size,
    channels, normalisation), read from its newest version's ONNX file. Made once per
    model: a benchmark asks for them before each scenario."""
    meta = read_onnx_metadata(latest_model_file(repo, model))
    prep = meta.model.preprocessing
    images = load_dataset("mnist5k").test.images[:IMAGES]
    if prep.channels == 3:
        images = np.repeat(images, 3, axis=3)
    x = to_input(resize_images(images, prep.color, prep.height, prep.width), prep)
    return Inputs(meta.export.input_name, x)


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of `pid` and its live descendants (Triton's stubs,
    MLServer's workers, the service's worker processes)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / _CLK_TCK
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent and p not in tree]
        tree.update(children)
        frontier += children
    return sum(times.get(p, 0.0) for p in tree)


def perf_analyzer(address: str, inputs: Inputs, load: Load, workdir: Path) -> Measured:
    """perf_analyzer over gRPC at a fixed concurrency: three windows of seconds/3 each,
    reported as their mean (stability 100%: the first three windows are kept)."""
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / f"{load.model}-inputs.json"
    if not data.exists():
        steps = [{inputs.name: {"content": image.ravel().tolist(), "shape": list(image.shape)}}
                 for image in inputs.images[:64]]
        data.write_text(json.dumps({"data": steps}))
    report = workdir / (f"{load.model}-c{load.concurrency}-b{load.images_per_request}"
                        f"{'-stream' if load.streaming else ''}.csv")
    window_ms = max(int(load.seconds * 1000 / 3), 500)
    cmd = [str(PERF_ANALYZER), "-m", load.model, "-x", load.version, "-u", address, "-i", "grpc",
           "-b", str(load.images_per_request), "--concurrency-range", str(load.concurrency),
           "--input-data", str(data), "--measurement-interval", str(window_ms),
           "--stability-percentage", "100", "--max-trials", "3", "--percentile", "50",
           "-f", str(report), *(["--streaming"] if load.streaming else [])]
    started, cpu = time.perf_counter(), _children_cpu_s()
    env = {**os.environ, **({"TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT": "1"}
                            if load.connection_each else {})}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env,
                         timeout=load.seconds * 4 + 120)
    elapsed, cpu = time.perf_counter() - started, _children_cpu_s() - cpu
    if run.returncode != 0:
        raise RuntimeError(f"perf_analyzer exited {run.returncode}:\n{run.stdout[-2000:]}"
                           f"{run.stderr[-2000:]}")
    with open(report, newline="") as f:
        row = next(csv.DictReader(f))
    per_s = float(row["Inferences/Second"]) / load.images_per_request
    # Requests over the whole run (for CPU per request): its windows' rate, start to end.
    requests = round(per_s * elapsed)
    return Measured("perf_analyzer", requests, 0, per_s,
                    float(row["p50 latency"]) / 1e3, float(row["p95 latency"]) / 1e3,
                    float(row["p99 latency"]) / 1e3, float("nan"), load.images_per_request,
                    cpu / max(requests, 1) * 1e6)


def _children_cpu_s() -> float:
    """CPU time of this process's finished children (perf_analyzer, once it is waited)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def closed_loop(address: str, inputs: Inputs, load: Load) -> Measured:
    """`load.concurrency` callers on one channel, each sending its next request as its
    answer arrives, for `load.seconds` (with `load.streaming`, each over a stream of its
    own); answers are checked for status, not parsed."""
    from protos import grpc_service_pb2 as pb  # not at import: tests load tritonclient's

    n = load.images_per_request
    requests = []
    for start in range(0, IMAGES, n):
        rows = np.resize(inputs.images[start:start + n], (n, *inputs.images.shape[1:]))
        requests.append(pb.ModelInferRequest(
            model_name=load.model, inputs=[pb.ModelInferRequest.InferInputTensor(
                name=inputs.name, datatype="FP32", shape=list(rows.shape))],
            raw_input_contents=[rows.astype("<f4").tobytes()]).SerializeToString())
    return asyncio.run(_closed_loop(address, requests, load))


async def _closed_loop(address: str, requests: list[bytes], load: Load) -> Measured:
    latencies: list[float] = []
    errors = 0
    async with grpc.aio.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", 64 << 20)]) as channel:
        call = channel.unary_unary(_INFER)  # bytes in, bytes out
        with contextlib.suppress(grpc.aio.AioRpcError):  # connected before the clock starts
            await call(requests[0], timeout=30)
        started, cpu = time.perf_counter(), time.process_time()
        stop = started + load.seconds

        async def caller(k: int) -> None:
            nonlocal errors
            while (sent := time.perf_counter()) < stop:
                try:
                    await call(requests[k % len(requests)], timeout=30)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - sent)
                k += load.concurrency

        async def streamer(k: int) -> None:
            nonlocal errors
            stream = channel.stream_stream(_STREAM_INFER)(timeout=load.seconds + 30)
            try:
                while (sent := time.perf_counter()) < stop:
                    await stream.write(requests[k % len(requests)])
                    answer = await stream.read()
                    if answer is grpc.aio.EOF:
                        raise RuntimeError("the server ended a ModelStreamInfer stream")
                    if answer.startswith(_STREAM_ERROR):
                        errors += 1
                    else:
                        latencies.append(time.perf_counter() - sent)
                    k += load.concurrency
                await stream.done_writing()
            except grpc.aio.AioRpcError:
                errors += 1

        await asyncio.gather(*((streamer if load.streaming else caller)(k)
                               for k in range(load.concurrency)))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    ms = np.percentile(np.asarray(latencies or [np.nan]) * 1e3, [50, 95, 99])
    return Measured("asyncio gRPC" + " streams" * load.streaming, len(latencies), errors,
                    len(latencies) / elapsed,
                    float(ms[0]), float(ms[1]), float(ms[2]), float("nan"),
                    load.images_per_request, cpu / max(len(latencies), 1) * 1e6)


def measured_with_cpu(server_pid: int, measure: Callable[..., Measured], *args: object
                      ) -> Measured:
    """`measure(*args)`, with the server's CPU time over it per answered request."""
    before = tree_cpu_s(server_pid)
    result: Measured = measure(*args)
    used = tree_cpu_s(server_pid) - before
    answered = result.requests
    return replace(result, server_cpu_us=used / answered * 1e6 if answered else float("nan"))


def main(argv: list[str] | None = None) -> int:
    """One load point against a running server, printed as JSON."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m loadtests.perf", description=__doc__)
    p.add_argument("address", help="host:port of the server's gRPC port")
    p.add_argument("--repo", type=Path, required=True, help="for the model's inputs")
    p.add_argument("--model", default="lenet")
    p.add_argument("--version", default="1", help="the version perf_analyzer measures")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--client", choices=("closed-loop", "perf_analyzer"), default="closed-loop")
    p.add_argument("--streaming", action="store_true",
                   help="each caller's requests over one ModelStreamInfer stream")
    p.add_argument("--server-pid", type=int, help="account this process tree's CPU")
    p.add_argument("--workdir", type=Path, default=Path("reports/perf"),
                   help="perf_analyzer's input and report files")
    args = p.parse_args(argv)
    inputs = real_inputs(args.repo, args.model)
    load = Load(args.model, args.concurrency, args.images_per_request, args.seconds,
                args.version, streaming=args.streaming)
    run: tuple[Callable[..., Measured], tuple[object, ...]] = (
        (closed_loop, (args.address, inputs, load)) if args.client == "closed-loop"
        else (perf_analyzer, (args.address, inputs, load, args.workdir)))
    result = (measured_with_cpu(args.server_pid, run[0], *run[1]) if args.server_pid
              else run[0](*run[1]))
    print(json.dumps({**result.__dict__, "images_per_s": result.images_per_s}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
