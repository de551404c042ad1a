"""`python -m loadtests.mlperf`: MLPerf Inference's LoadGen against any Open Inference
Protocol gRPC address, the way serving systems are judged.

LoadGen (`mlcommons-loadgen`) decides when each query is sent and whether a run counts;
this module is only its system under test: each query is one image, sent as one
`ModelInfer` with grpcio's `future` (the same client for every server), and completed
when its answer arrives. Three scenarios:

- SingleStream: one query at a time; the figure is its p90 latency.
- Server: queries arrive as a Poisson process at a target rate. A rate is valid when
  LoadGen finds its performance constraint met (the p99 latency within the bound) over
  at least `min_queries`, and no query failed. The figure is the highest valid rate,
  found by bisection and confirmed by a second run, stepping down 10% while the
  confirmation fails: one hiccup of a shared host fails a p99.
- Offline: every query at once; the client keeps `OFFLINE_WINDOW` in flight. The figure
  is images/s, and the first guess of the Server search.

LoadGen's overall verdict also asks for its early-stopping test, which runs of a few
thousand queries fail on count alone: it is reported, not required (as the issue that
introduced this benchmark set out). Each run also records the server's CPU per query
(its process tree, where its pid is known) and the mean executed batch, from the
server's own ModelStatistics.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import numpy as np

from loadtests.perf import Inputs, real_inputs, tree_cpu_s

_INFER = "/inference.GRPCInferenceService/ModelInfer"
BOUNDS_MS = {"lenet": 10.0, "alexnet": 15.0, "vgg11_bn": 15.0, "vgg16_bn": 15.0}
"""The Server scenario's default p99 bound per model."""
DEFAULT_BOUND_MS = 15.0
OFFLINE_WINDOW = 64
"""Queries the Offline client keeps in flight: a client's window, not a server's queue."""
QUERY_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Run:
    """One LoadGen test, as its summary and the server's statistics tell it."""

    scenario: str
    target_qps: float
    """The Poisson rate asked for (Server); 0 otherwise."""
    valid: bool
    """Server: the p99 bound met over enough queries, and no query failed. Others: no
    query failed."""
    queries: int
    errors: int
    """Queries the server answered with an error, by status name."""
    error_codes: dict[str, int]
    qps: float
    """Server: scheduled queries/s; Offline: images/s; SingleStream: queries/s."""
    p50_ms: float
    p90_ms: float
    p99_ms: float
    early_stopping: bool
    """LoadGen's early-stopping verdict (reported; short runs fail it on count alone)."""
    server_cpu_us: float
    """Server CPU per query (its process tree); nan where its pid is not known."""
    mean_batch: float
    """Images per executed batch in the server's statistics; nan where it keeps none."""
    answered_p99_ms: float = float("nan")
    """The p99 of the queries answered OK, as this client timed them: past capacity,
    what the requests a server accepted got (LoadGen's p99 counts refusals as quick
    answers); nan where none was answered."""


@dataclass(frozen=True)
class Peak:
    """The Server scenario's figure: the highest valid rate, confirmed."""

    qps: float
    bound_ms: float
    runs: list[Run]
    """Every run of the search, in order."""


def _requests(model: str, inputs: Inputs, version: str) -> list[bytes]:
    """One serialised single-image ModelInfer per distinct test digit."""
    from protos import grpc_service_pb2 as pb  # not at import: tests load tritonclient's

    out = []
    for image in inputs.images:
        rows = image[None]
        out.append(pb.ModelInferRequest(
            model_name=model, model_version=version, inputs=[
                pb.ModelInferRequest.InferInputTensor(name=inputs.name, datatype="FP32",
                                                      shape=list(rows.shape))],
            raw_input_contents=[rows.astype("<f4").tobytes()]).SerializeToString())
    return out


def executed(address: str, model: str) -> tuple[int, int] | None:
    """The server's (inference_count, execution_count) for `model`, as Triton's
    ModelStatistics reports them; None where the server answers none."""
    from protos import grpc_service_pb2 as pb
    from protos import grpc_service_pb2_grpc as pb_grpc

    try:
        with grpc.insecure_channel(address) as channel:
            stats = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
                pb.ModelStatisticsRequest(name=model), timeout=10)
    except grpc.RpcError:
        return None
    found = [m for m in stats.model_stats if m.name == model]
    return (sum(m.inference_count for m in found), sum(m.execution_count for m in found)) \
        if found else None


def mean_batch(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float:
    if before is None or after is None or after[1] <= before[1]:
        return float("nan")
    return (after[0] - before[0]) / (after[1] - before[1])


class GrpcSut:
    """LoadGen's system under test: one ModelInfer per query sample, completed from
    grpcio's callback thread when its answer (or error) arrives."""

    def __init__(self, address: str, requests: list[bytes], window: int | None = None) -> None:
        import mlperf_loadgen as lg

        self.lg = lg
        self.channel = grpc.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", 64 << 20)])
        self.call = self.channel.unary_unary(_INFER)  # bytes in, bytes out
        self.requests = requests
        self.window = window
        """Offline: at most this many in flight; None: each query as LoadGen issues it."""
        self.lock = threading.Lock()
        self.errors: dict[str, int] = {}
        self.answered_s: list[float] = []
        """Send to answer, each query answered OK."""
        self.backlog: list[tuple[int, int]] = []
        self.in_flight = 0
        self.sut = lg.ConstructSUT(self.issue, self.flush)
        self.qsl = lg.ConstructQSL(len(requests), len(requests), lambda _: None,
                                   lambda _: None)

    def warm(self) -> None:
        """Connected, and the model's first answer out of the way, before LoadGen starts."""
        self.call(self.requests[0], timeout=QUERY_TIMEOUT_S)

    def issue(self, samples: Sequence[object]) -> None:
        queued = [(s.id, s.index) for s in samples]  # type: ignore[attr-defined]
        if self.window is None:
            for sample_id, index in queued:
                self._send(sample_id, index)
            return
        with self.lock:
            self.backlog.extend(reversed(queued))
        self._refill()

    def _refill(self) -> None:
        while True:
            with self.lock:
                if not self.backlog or self.in_flight >= (self.window or 0):
                    return
                sample_id, index = self.backlog.pop()
                self.in_flight += 1
            self._send(sample_id, index)

    def _send(self, sample_id: int, index: int) -> None:
        sent = time.perf_counter()
        future = self.call.future(self.requests[index], timeout=QUERY_TIMEOUT_S)
        future.add_done_callback(lambda f: self._done(sample_id, f, sent))

    def _done(self, sample_id: int, future: grpc.Future, sent: float) -> None:
        took = time.perf_counter() - sent
        error = future.exception()
        if error is not None:
            code = error.code().name if isinstance(error, grpc.Call) else type(error).__name__
            with self.lock:
                self.errors[code] = self.errors.get(code, 0) + 1
        else:
            self.answered_s.append(took)  # list.append is atomic under the GIL
        self.lg.QuerySamplesComplete([self.lg.QuerySampleResponse(sample_id, 0, 0)])
        if self.window is not None:
            with self.lock:
                self.in_flight -= 1
            self._refill()

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.lg.DestroyQSL(self.qsl)
        self.lg.DestroySUT(self.sut)
        self.channel.close()


def summary(text: str) -> dict[str, str]:
    """`key : value` lines of LoadGen's mlperf_log_summary.txt."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def detail(text: str) -> dict[str, object]:
    """The `result_*` values of LoadGen's mlperf_log_detail.txt (`:::MLLOG {json}` lines)."""
    out = {}
    for line in text.splitlines():
        if line.startswith(":::MLLOG "):
            entry = json.loads(line[len(":::MLLOG "):])
            if str(entry.get("key", "")).startswith("result_"):
                out[entry["key"]] = entry.get("value")
    return out


def _latency_ms(found: dict[str, str], percentile: float) -> float:
    for key, value in found.items():
        match = re.fullmatch(r"([\d.]+) percentile latency \(ns\)", key)
        if match and math.isclose(float(match[1]), percentile):
            return float(value) / 1e6
    return float("nan")


@dataclass(frozen=True)
class Target:
    """What LoadGen drives: a server's address and one model on it."""

    address: str
    model: str
    inputs: Inputs
    version: str = ""
    server_pid: int | None = None


def run(target: Target, scenario: str, *, qps: float = 0.0, bound_ms: float = 0.0,
        min_queries: int = 2000, min_seconds: float = 5.0, expected_qps: float = 1000.0,
        max_seconds: float = 120.0) -> Run:
    """One LoadGen test of `scenario` ("SingleStream", "Server" at `qps` with p99 within
    `bound_ms`, or "Offline" with `expected_qps` guiding its query count)."""
    import mlperf_loadgen as lg

    settings = lg.TestSettings()
    settings.scenario = getattr(lg.TestScenario, scenario)
    settings.mode = lg.TestMode.PerformanceOnly
    settings.min_query_count = min_queries
    settings.min_duration_ms = int(min_seconds * 1000)
    settings.max_duration_ms = int(max_seconds * 1000)
    if scenario == "Server":
        settings.server_target_qps = qps
        settings.server_target_latency_ns = int(bound_ms * 1e6)
        settings.server_target_latency_percentile = 0.99
    elif scenario == "Offline":
        settings.offline_expected_qps = expected_qps
    else:
        settings.single_stream_expected_latency_ns = 1_000_000
    requests = _requests(target.model, target.inputs, target.version)
    sut = GrpcSut(target.address, requests, OFFLINE_WINDOW if scenario == "Offline" else None)
    try:
        sut.warm()
        with tempfile.TemporaryDirectory(prefix="loadgen-") as outdir:
            log = lg.LogSettings()
            log.log_output.outdir = outdir
            log.log_output.copy_summary_to_stdout = False
            log.enable_trace = False
            counts = executed(target.address, target.model)
            cpu = tree_cpu_s(target.server_pid) if target.server_pid else float("nan")
            lg.StartTestWithLogSettings(sut.sut, sut.qsl, settings, log)
            cpu = tree_cpu_s(target.server_pid) - cpu if target.server_pid else float("nan")
            batch = mean_batch(counts, executed(target.address, target.model))
            found = summary((Path(outdir) / "mlperf_log_summary.txt").read_text())
            results = detail((Path(outdir) / "mlperf_log_detail.txt").read_text())
    finally:
        sut.close()
    errors = sum(sut.errors.values())
    queries = int(str(results.get("result_query_count", 0)))
    if scenario == "Server":
        rate = float(found.get("Scheduled samples per second", "nan"))
        met = (found.get("Performance constraints satisfied") == "Yes"
               and found.get("Min queries satisfied") == "Yes")
    else:
        key = "Samples per second" if scenario == "Offline" else "QPS w/o loadgen overhead"
        rate = float(found.get(key, found.get("QPS w/ loadgen overhead", "nan")))
        met = True
    return Run(scenario, qps, met and errors == 0, queries, errors, dict(sut.errors), rate,
               _latency_ms(found, 50), _latency_ms(found, 90), _latency_ms(found, 99),
               found.get("Early stopping satisfied") == "Yes",
               cpu / queries * 1e6 if queries else float("nan"), batch,
               float(np.percentile(sut.answered_s, 99)) * 1e3 if sut.answered_s
               else float("nan"))


def peak(trial: Callable[[float], Run], first_guess: float, *, steps: int = 6,
         say: Callable[[str], None] = print) -> tuple[float, list[Run]]:
    """The highest rate at which `trial` (one Server run) is valid, and every run made:
    bisection between a rate that failed and one that held, from half of `first_guess`
    (the Offline throughput) until they are within 3% or `steps` runs; then the rate
    found is run again, stepping down 10% while that confirmation fails. 0 if none held."""
    runs: list[Run] = []

    def valid(qps: float) -> bool:
        result = trial(qps)
        runs.append(result)
        say(f"    Server {qps:8.1f} q/s: {'valid' if result.valid else 'INVALID'}, p99 "
            f"{result.p99_ms:.2f} ms, mean batch {result.mean_batch:.2f}, "
            f"{result.server_cpu_us:.0f} us server CPU/query"
            + (f", errors {result.error_codes}" if result.errors else ""))
        return result.valid

    low, high = 0.0, max(first_guess, 1.0)
    rate = high / 2
    for _ in range(steps):
        if valid(rate):
            low = rate
        else:
            high = rate
        if low and high - low <= 0.03 * low:
            break
        rate = (low + high) / 2 if low else high / 2
    for _ in range(6):
        if low <= 0.0:
            break
        if valid(low):
            return low, runs
        low *= 0.9
    return 0.0, runs


def server_peak(target: Target, bound_ms: float, first_guess: float, *,
                min_queries: int = 2000, min_seconds: float = 5.0,
                say: Callable[[str], None] = print) -> Peak:
    """`peak` of LoadGen's Server scenario on `target` at a p99 of `bound_ms`."""
    qps, runs = peak(lambda rate: run(target, "Server", qps=rate, bound_ms=bound_ms,
                                      min_queries=min_queries, min_seconds=min_seconds),
                     first_guess, say=say)
    return Peak(qps, bound_ms, runs)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.mlperf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("address", help="host:port of an Open Inference Protocol gRPC server")
    p.add_argument("--repo", type=Path, default=Path("runs/demo/model_repository"),
                   help="for the models' inputs (test digits, preprocessed)")
    p.add_argument("--models", nargs="+", default=["lenet", "alexnet"])
    p.add_argument("--scenarios", nargs="+", default=["SingleStream", "Offline", "Server"],
                   choices=["SingleStream", "Offline", "Server"])
    p.add_argument("--bound-ms", type=float, help="Server p99 bound (default: per model, "
                   f"{BOUNDS_MS}, else {DEFAULT_BOUND_MS})")
    p.add_argument("--qps", type=float, help="Server: one run at this rate, no search")
    p.add_argument("--min-queries", type=int, default=2000)
    p.add_argument("--min-seconds", type=float, default=5.0)
    p.add_argument("--server-pid", type=int, help="account this process tree's CPU")
    p.add_argument("--json", type=Path, help="write every run here")
    args = p.parse_args(argv)
    found: dict[str, object] = {}
    for model in args.models:
        target = Target(args.address, model, real_inputs(args.repo, model),
                        server_pid=args.server_pid)
        bound = args.bound_ms or BOUNDS_MS.get(model, DEFAULT_BOUND_MS)
        results: dict[str, object] = {}
        offline = None
        for scenario in args.scenarios:
            if scenario == "Server":
                if args.qps:
                    one = run(target, "Server", qps=args.qps, bound_ms=bound,
                              min_queries=args.min_queries, min_seconds=args.min_seconds)
                    results["Server"] = asdict(one)
                    print(f"{model} Server at {args.qps:g} q/s: "
                          f"{'valid' if one.valid else 'INVALID'}, p99 {one.p99_ms:.2f} ms "
                          f"(answered OK: {one.answered_p99_ms:.2f} ms), mean batch "
                          f"{one.mean_batch:.2f}, errors {one.error_codes}")
                    continue
                guess = offline.qps if offline else 1000.0
                print(f"{model}: Server search, p99 <= {bound:g} ms, from {guess:.0f} q/s")
                top = server_peak(target, bound, guess, min_queries=args.min_queries,
                                  min_seconds=args.min_seconds)
                results["Server"] = {"peak_qps": top.qps, "bound_ms": bound,
                                     "runs": [asdict(r) for r in top.runs]}
                print(f"{model} Server: {top.qps:.1f} q/s at p99 <= {bound:g} ms")
                continue
            one = run(target, scenario, min_queries=args.min_queries,
                      min_seconds=args.min_seconds)
            offline = one if scenario == "Offline" else offline
            results[scenario] = asdict(one)
            print(f"{model} {scenario}: {one.qps:.1f} q/s, p50 {one.p50_ms:.2f} ms, p90 "
                  f"{one.p90_ms:.2f} ms, p99 {one.p99_ms:.2f} ms, mean batch "
                  f"{one.mean_batch:.2f}, errors {one.error_codes}")
        found[model] = results
    if args.json:
        args.json.write_text(json.dumps(found, indent=2, default=float))
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    raise SystemExit(main())
