"""`python -m loadtests.bench`: every scenario in one run, so ratios are fair on a noisy host.

Starts the service (batching on, then off) and a trivial echo server on loopback, drives
each scenario, scrapes the server's batch-size metrics, measures onnxruntime in-process
as the ceiling, and writes `reports/<timestamp>/` with the Markdown summary, the
clients' files and PNG plots. Every run is bounded in time.

The throughput and latency sweeps (Open Inference Protocol over gRPC) are driven by
perf_analyzer when `make perf-analyzer` installed it: Triton's C++ load generator costs
the shared host far less CPU than a Python client, and each of its rows also gives the
server's CPU time per request. perf_analyzer also sends single images over
ModelStreamInfer streams (api `oip-stream`), for the service and the echo server: what a
client that streams gains when gRPC sets up one call per stream, not one per request.
Locust drives the user-facing scenarios (PNG classification, REST) and everything when
perf_analyzer is absent or with --quick.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from contract.repository import (
    FP16_MODEL_FILE,
    latest_model_file,
    list_models,
    list_versions,
    serving_config,
)
from loadtests.launch import ROOT, free_port, launched
from loadtests.perf import (
    Load,
    measured_with_cpu,
    perf_analyzer,
    perf_analyzer_installed,
    real_inputs,
)
from loadtests.report import (
    LocustStats,
    Reference,
    ScenarioResult,
    read_locust_stats,
    row_name,
    write_report,
)
from service.app.cli import parse_settings
from service.app.settings import ServiceSettings
from service.engine.batching import resolve_policy
from service.engine.runtime import ModelRunner, place

LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
HTTP_LOCUSTFILE = ROOT / "loadtests" / "http_locustfile.py"
METHOD = {"oip": (LOCUSTFILE, "InferenceUser", "ModelInfer"),
          "classifier": (LOCUSTFILE, "ClassifierUser", "Predict"),
          "rest-binary": (HTTP_LOCUSTFILE, "HttpBinaryUser", "REST infer binary"),
          "rest-json": (HTTP_LOCUSTFILE, "HttpJsonUser", "REST infer json"),
          "rest-png": (HTTP_LOCUSTFILE, "HttpPngUser", "REST classify png")}
"""Per api: the locustfile, its user class, and the row it reports."""


@dataclass(frozen=True)
class Scenario:
    name: str
    model: str
    api: str
    users: int
    images_per_request: int
    batching: bool
    echo: bool = False

    @property
    def slug(self) -> str:
        mode = "echo" if self.echo else ("on" if self.batching else "off")
        return (f"{self.name}-{self.model}-{self.api}-u{self.users}-i{self.images_per_request}"
                f"-{mode}")


def plan(models: Sequence[str], quick: bool, streams: bool = False) -> list[Scenario]:
    """The scenario list: quick for the demo, full for the report. `streams` adds the
    ModelStreamInfer scenarios (api "oip-stream"), which only perf_analyzer drives."""
    if quick:
        return [Scenario("batching", m, "oip", 16, 1, True) for m in models]
    focus = "alexnet" if "alexnet" in models else models[0]
    smallest = "lenet" if "lenet" in models else models[0]
    scenarios = [Scenario("batching", m, "oip", 32, 1, on) for on in (True, False) for m in models]
    scenarios += [Scenario("sweep", m, "oip", u, 1, True) for m in models for u in (1, 8, 64)]
    scenarios += [Scenario("multi-image", m, "oip", 8, 8, True) for m in models]
    # Whole-batch requests: the least client work per image, so the closest the server
    # gets to onnxruntime's own batch-32 throughput with the load generator on this host.
    scenarios += [Scenario("saturation", m, "oip", 4, 32, True) for m in models]
    scenarios += [Scenario("png", focus, "classifier", 32, 1, True),
                  Scenario("png", focus, "rest-png", 32, 1, True),
                  Scenario("transport", smallest, "oip", 32, 1, True),
                  Scenario("transport", smallest, "rest-binary", 32, 1, True),
                  Scenario("transport", smallest, "rest-json", 32, 1, True),
                  Scenario("transport", smallest, "oip", 1, 1, True),
                  Scenario("transport", "echo", "oip", 32, 1, False, echo=True),
                  Scenario("transport", "echo", "oip", 1, 1, False, echo=True)]
    if streams:  # the same single images, each caller's over one stream
        scenarios += [Scenario("batching", focus, "oip-stream", 32, 1, True),
                      Scenario("transport", smallest, "oip-stream", 32, 1, True),
                      Scenario("transport", "echo", "oip-stream", 32, 1, False, echo=True)]
    return scenarios


def batch_buckets(metrics_url: str | None, model: str) -> dict[str, float]:
    if metrics_url is None:
        return {}
    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    cumulative_by_le: dict[str, float] = {}
    for labels, value in re.findall(r'^cnnserve_batch_size_bucket\{([^}]*)\} (\S+)$', text,
                                    re.M):
        found = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if found.get("model") == model:  # summed over versions
            cumulative_by_le[found["le"]] = cumulative_by_le.get(found["le"], 0.0) + float(value)
    cumulative = {le: v for le, v in cumulative_by_le.items() if le != "+Inf"}
    bounds = sorted(cumulative, key=float)
    return {b: cumulative[b] - (cumulative[bounds[i - 1]] if i else 0.0)
            for i, b in enumerate(bounds)}


def run_locust(target: str, scenario: Scenario, seconds: float, prefix: Path,
               processes: int = 1, extra: Sequence[str] = ()) -> None:
    locustfile, user_class, _ = METHOD[scenario.api]
    cmd = [sys.executable, "-m", "locust", "-f", str(locustfile), "--headless", "--host", target,
           *(["--processes", str(processes)] if processes > 1 else []),
           "-u", str(scenario.users), "-r", str(scenario.users), "-t", f"{seconds:g}s",
           "--stop-timeout", "5", "--csv", str(prefix), "--html", f"{prefix}.html",
           "--only-summary", "--model", scenario.model,
           "--images-per-request", str(scenario.images_per_request), *extra, user_class]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=seconds + 120,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@dataclass(frozen=True)
class Target:
    """A running server as a scenario sees it."""

    address: str
    """host:port of the gRPC port (REST scenarios get the HTTP port's URL)."""
    pid: int
    repo: Path
    version: str
    """The model version perf_analyzer is told to measure."""


def measure(scenario: Scenario, target: str, metrics_url: str | None, seconds: float,
            out: Path, processes: int = 1, server: Target | None = None) -> ScenarioResult:
    """One scenario: perf_analyzer when `server` is given and the scenario is gRPC
    inference (calls, or requests over streams), Locust otherwise."""
    before = batch_buckets(metrics_url, scenario.model)
    cpu_us = client_cpu_us = None
    if server is not None and scenario.api in ("oip", "oip-stream"):
        model = "lenet" if scenario.echo else scenario.model
        measured = measured_with_cpu(
            server.pid, perf_analyzer, server.address, real_inputs(server.repo, model),
            Load(scenario.model, scenario.users, scenario.images_per_request, seconds,
                 server.version, streaming=scenario.api == "oip-stream"),
            out / "perf_analyzer")
        stats = LocustStats(name=scenario.slug, requests=measured.requests, failures=0,
                            rps=measured.requests_per_s, p50_ms=measured.p50_ms,
                            p95_ms=measured.p95_ms, p99_ms=measured.p99_ms)
        client, cpu_us = "perf_analyzer", measured.server_cpu_us
        client_cpu_us = measured.client_cpu_us
    else:
        prefix = out / scenario.slug
        run_locust(target, scenario, seconds, prefix, processes)
        stats = read_locust_stats(Path(f"{prefix}_stats.csv"), row_name(
            METHOD[scenario.api][2], scenario.model, scenario.images_per_request))
        client = "locust"
    after = batch_buckets(metrics_url, scenario.model)
    result = ScenarioResult(
        scenario=scenario.name, model=scenario.model, api=scenario.api, users=scenario.users,
        images_per_request=scenario.images_per_request, batching=scenario.batching,
        stats=stats, batch_sizes={b: after[b] - before.get(b, 0.0) for b in after},
        client=client, server_cpu_us=cpu_us, client_cpu_us=client_cpu_us,
        host_cores=os.cpu_count())
    print(f"  {scenario.slug}: {stats.rps:.0f} req/s, p50 {stats.p50_ms:.2f} ms, "
          f"p99 {stats.p99_ms:.2f} ms, {stats.failures} errors ({client}"
          + (f", {cpu_us:.0f} us server and {client_cpu_us:.0f} us client CPU/request)"
             if cpu_us is not None else ")"),
          flush=True)
    return result


def in_process(repo: Path, model: str, batch_size: int, settings: ServiceSettings,
               seconds: float = 2.0, rounds: int = 3) -> Reference:
    """onnxruntime's own throughput with the server's session options, no gRPC: as many
    sessions as the server's instances, each run back to back in its own thread. The
    best of `rounds`: on a shared host one slow round would flatter every ratio."""
    path = latest_model_file(repo, model)
    config = serving_config(repo, model, path)
    instances = resolve_policy(model, config, settings).instances
    placement = place(settings.device)
    if settings.precision == "fp16" and placement.cuda:  # as the server chooses it
        path = path.with_name(FP16_MODEL_FILE)
    runners = [ModelRunner(path, settings, config, placement) for _ in range(instances)]
    (spec,) = config.inputs
    x = {spec.name: np.random.default_rng(0).standard_normal(
        (batch_size, *spec.shape)).astype(np.float32)}
    for runner in runners:
        runner.warmup([batch_size])

    def loop(runner: ModelRunner, started: float) -> int:
        runs = 0
        while time.perf_counter() - started < seconds and runs < 100_000:
            runner.run(x)
            runs += 1
        return runs

    best = 0.0
    with ThreadPoolExecutor(instances) as pool:
        for _ in range(rounds):
            started = time.perf_counter()
            runs = sum(pool.map(loop, runners, [started] * instances))
            best = max(best, runs * batch_size / (time.perf_counter() - started))
    return Reference(model=model, batch_size=batch_size, images_per_s=best)


def ratios(results: list[ScenarioResult], refs: list[Reference]) -> list[tuple[str, float, str]]:
    """Served against its ceilings (onnxruntime in-process, the echo server), with the
    targets of the issue that set them."""
    out = []

    def find(**kw: object) -> ScenarioResult | None:
        return next((r for r in results if all(getattr(r, k) == v for k, v in kw.items())),
                    None)

    ceiling = {(r.model, r.batch_size): r.images_per_s for r in refs}
    for model in dict.fromkeys(r.model for r in refs):
        batch32 = ceiling.get((model, 32))
        whole = find(scenario="saturation", model=model)
        if whole and batch32:
            out.append((f"{model}: {whole.images_per_request}-image requests, served / "
                        "in-process img/s at batch 32", whole.images_per_s / batch32,
                        "(no target)" if model == "lenet" else ">= 0.95"))
        single = find(scenario="batching", model=model, batching=True, api="oip")
        if single and batch32:
            out.append((f"{model}: single images from {single.users} clients, served / "
                        "in-process img/s at batch 32", single.images_per_s / batch32,
                        ">= 0.6" if model == "alexnet" else "(no target)"))
        streamed = find(scenario="batching", model=model, api="oip-stream")
        if streamed and batch32:
            out.append((f"{model}: single images from {streamed.users} streams, served / "
                        "in-process img/s at batch 32", streamed.images_per_s / batch32,
                        "(no target; 0.6 for calls)" if model == "alexnet" else "(no target)"))
    for on in (r for r in results
               if r.scenario == "batching" and r.batching and r.api == "oip"):
        off = find(scenario="batching", model=on.model, batching=False)
        if off is not None and off.images_per_s > 0:
            target = ">= 1.5" if on.model == "alexnet" else "(no target)"
            out.append((f"{on.model}: batching on / off img/s at {on.users} users",
                        on.images_per_s / off.images_per_s, target))
    served = find(scenario="transport", batching=True, api="oip", users=32)
    echo = find(scenario="transport", batching=False, api="oip", users=32)
    if served and echo and echo.stats.rps > 0:
        out.append((f"{served.model}: req/s / echo req/s (1 image, 32 clients)",
                    served.stats.rps / echo.stats.rps, ">= 0.9"))
    streamed = find(scenario="transport", batching=True, api="oip-stream", users=32)
    echo_streamed = find(scenario="transport", batching=False, api="oip-stream", users=32)
    if streamed and echo_streamed and echo_streamed.stats.rps > 0:
        out.append((f"{streamed.model}: req/s / echo req/s (1 image, 32 streams)",
                    streamed.stats.rps / echo_streamed.stats.rps, "(no target)"))
    if streamed and served and served.stats.rps > 0:
        out.append((f"{streamed.model}: 32 streams / 32 clients' calls, req/s",
                    streamed.stats.rps / served.stats.rps, "(no target)"))
    lone = find(scenario="transport", batching=True, api="oip", users=1)
    lone_echo = find(scenario="transport", batching=False, api="oip", users=1)
    if lone and lone_echo and (lone.model, 1) in ceiling:
        bound = lone_echo.stats.p50_ms + 1e3 / ceiling[(lone.model, 1)] + 0.3
        out.append((f"{lone.model}: p50 at 1 client / (echo p50 + in-process batch 1 + 0.3 ms"
                    f" = {bound:.2f} ms)", lone.stats.p50_ms / bound, "<= 1.0"))
    for api, target in (("rest-binary", ">= 0.8"), ("rest-json", ">= 0.6")):
        rest = find(scenario="transport", batching=True, api=api)
        if served and rest and served.stats.rps > 0:
            out.append((f"{rest.model}: {api} / gRPC req/s (1 image, {rest.users} users)",
                        rest.stats.rps / served.stats.rps, target))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench", description=__doc__)
    p.add_argument("--repo", type=Path, default=Path("runs/demo/model_repository"))
    p.add_argument("--out", type=Path, default=Path("reports"))
    p.add_argument("--seconds", type=float, default=20.0, help="Locust run time per scenario")
    p.add_argument("--quick", action="store_true", help="a short load test (the demo's)")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    p.add_argument("--models", nargs="*", help="default: every model in --repo")
    p.add_argument("--processes", type=int, default=1,
                   help="Locust load-generator processes (more for a fast GPU server)")
    p.add_argument("--workers", type=int, default=1, help="server processes (--workers)")
    p.add_argument("--server-args", default="",
                   help="extra server flags, e.g. \"--instances 2 --intra-op-threads 1\"")
    p.add_argument("--client", choices=("perf_analyzer", "locust"),
                   help="for gRPC inference scenarios; default: perf_analyzer when installed "
                   "(make perf-analyzer), Locust with --quick or without it")
    args = p.parse_args(argv)
    if args.client is None:
        args.client = ("perf_analyzer" if perf_analyzer_installed() and not args.quick
                       else "locust")
    elif args.client == "perf_analyzer" and not perf_analyzer_installed():
        p.error("perf_analyzer is not installed: make perf-analyzer")

    models = args.models or list_models(args.repo)
    out = args.out / datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    scenarios = plan(models, args.quick, streams=args.client == "perf_analyzer")
    # The in-process reference uses the served sessions' options, flags included.
    settings, _ = parse_settings(["--device", args.device, *shlex.split(args.server_args)])
    print(f"benchmark: {len(scenarios)} scenarios of {args.seconds:g}s, models {models}, "
          f"device {args.device}; report in {out}", flush=True)
    results: list[ScenarioResult] = []
    metrics_port, http_port = free_port(), free_port()
    serve = [sys.executable, "-m", "service", "--repo", str(args.repo), "--port", "0",
             "--metrics-port", str(metrics_port), "--probe-port", str(free_port()),
             "--http-port", str(http_port), "--device", args.device,
             *shlex.split(args.server_args)]
    if args.workers > 1:
        serve[serve.index("--port") + 1] = str(free_port())
    for batching in (True, False):
        todo = [s for s in scenarios if s.batching == batching and not s.echo]
        if not todo:
            continue
        extra = [] if batching else ["--max-batch-size", "1"]
        with launched(serve + extra + ["--workers", str(args.workers)],
                      processes=args.workers) as server:
            for scenario in todo:
                target = (f"http://127.0.0.1:{http_port}" if scenario.api.startswith("rest")
                          else f"127.0.0.1:{server.port}")
                pa = (Target(f"127.0.0.1:{server.port}", server.proc.pid, args.repo,
                             str(max(list_versions(args.repo, scenario.model))))
                      if args.client == "perf_analyzer" else None)
                results.append(measure(scenario, target,
                                       f"http://127.0.0.1:{metrics_port}/metrics",
                                       args.seconds, out, args.processes, pa))
    echo = [s for s in scenarios if s.echo]
    if echo:
        with launched([sys.executable, "-m", "loadtests.echo"]) as echo_server:
            pa = (Target(echo_server.address, echo_server.proc.pid, args.repo, "1")
                  if args.client == "perf_analyzer" else None)
            results += [measure(s, echo_server.address, None, args.seconds, out,
                                args.processes, pa)
                        for s in echo]
    refs = [in_process(args.repo, m, bs, settings) for m in models for bs in (1, 32)]
    notes = [f"Run {out.name}: {len(scenarios)} scenarios x {args.seconds:g}s, device "
             f"{args.device}, {args.workers} server process(es), gRPC inference driven by "
             f"{args.client}, the rest by Locust ({args.processes} process(es)), on the same "
             "host as the server; requests are single test digits unless img/req says "
             "otherwise."]
    summary = write_report(out, results, refs, ratios(results, refs), notes)
    print(summary.read_text().split("## onnxruntime")[0])
    print(f"report: {summary}")
    return 0 if all(r.stats.failures == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
