"""`python -m loadtests.bench`: every scenario in one run, so ratios are fair on a noisy host.

Starts the service (batching on, then off) and a trivial echo server on loopback, runs
Locust headless for each scenario, scrapes the server's batch-size metrics, measures
onnxruntime in-process as the ceiling, and writes `reports/<timestamp>/` with the
Markdown summary, Locust's CSV/HTML files and PNG plots. Every run is bounded in time.
"""

from __future__ import annotations

import argparse
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

from contract.repository import MODEL_FILE, list_models, list_versions, serving_config, version_dir
from loadtests.launch import ROOT, free_port, launched
from loadtests.report import (
    Reference,
    ScenarioResult,
    read_locust_stats,
    row_name,
    write_report,
)
from service.cli import parse_settings
from service.engine.batching import resolve_policy
from service.engine.runtime import ModelRunner
from service.settings import ServiceSettings

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


def plan(models: Sequence[str], quick: bool) -> list[Scenario]:
    """The scenario list: quick for the demo, full for the report."""
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
                  Scenario("transport", "echo", "oip", 32, 1, False, echo=True)]
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


def measure(scenario: Scenario, target: str, metrics_url: str | None, seconds: float,
            out: Path, processes: int = 1) -> ScenarioResult:
    before = batch_buckets(metrics_url, scenario.model)
    prefix = out / scenario.slug
    run_locust(target, scenario, seconds, prefix, processes)
    after = batch_buckets(metrics_url, scenario.model)
    stats = read_locust_stats(Path(f"{prefix}_stats.csv"), row_name(
        METHOD[scenario.api][2], scenario.model, scenario.images_per_request))
    result = ScenarioResult(
        scenario=scenario.name, model=scenario.model, api=scenario.api, users=scenario.users,
        images_per_request=scenario.images_per_request, batching=scenario.batching,
        stats=stats, batch_sizes={b: after[b] - before.get(b, 0.0) for b in after})
    print(f"  {scenario.slug}: {stats.rps:.0f} req/s, p50 {stats.p50_ms:.0f} ms, "
          f"p99 {stats.p99_ms:.0f} ms, {stats.failures} errors", flush=True)
    return result


def in_process(repo: Path, model: str, batch_size: int, settings: ServiceSettings,
               seconds: float = 3.0) -> Reference:
    """onnxruntime's own throughput with the server's session options, no gRPC: as many
    sessions as the server's instances, each run back to back in its own thread."""
    path = version_dir(repo, model, max(list_versions(repo, model))) / MODEL_FILE
    config = serving_config(repo, model, path)
    instances = resolve_policy(model, config, settings).instances
    runners = [ModelRunner(path, settings, config) for _ in range(instances)]
    (spec,) = config.inputs
    x = {spec.name: np.random.default_rng(0).standard_normal(
        (batch_size, *spec.shape)).astype(np.float32)}
    for runner in runners:
        runner.warmup([batch_size])
    started = time.perf_counter()

    def loop(runner: ModelRunner) -> int:
        runs = 0
        while time.perf_counter() - started < seconds and runs < 100_000:
            runner.run(x)
            runs += 1
        return runs

    with ThreadPoolExecutor(instances) as pool:
        runs = sum(pool.map(loop, runners))
    return Reference(model=model, batch_size=batch_size,
                     images_per_s=runs * batch_size / (time.perf_counter() - started))


def ratios(results: list[ScenarioResult], refs: list[Reference]) -> list[tuple[str, float, str]]:
    out = []

    def find(**kw: object) -> ScenarioResult | None:
        return next((r for r in results if all(getattr(r, k) == v for k, v in kw.items())),
                    None)

    for ref in (r for r in refs if r.batch_size == 32):
        best = max((r.images_per_s for r in results if r.model == ref.model and r.batching
                    and r.api == "oip"), default=0.0)
        target = ">= 0.9" if ref.model != "lenet" else "(no target)"
        out.append((f"{ref.model}: served / in-process img/s at batch 32", best /
                    ref.images_per_s, target))
    for on in (r for r in results if r.scenario == "batching" and r.batching):
        off = find(scenario="batching", model=on.model, batching=False)
        if off is not None and off.images_per_s > 0:
            target = ">= 1.5" if on.model == "alexnet" else "(no target)"
            out.append((f"{on.model}: batching on / off img/s at {on.users} users",
                        on.images_per_s / off.images_per_s, target))
    served = find(scenario="transport", batching=True, api="oip")
    echo = find(scenario="transport", batching=False)
    if served and echo and echo.stats.rps > 0:
        out.append((f"{served.model}: req/s / echo req/s (1 image)",
                    served.stats.rps / echo.stats.rps, ">= 0.8"))
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
    args = p.parse_args(argv)

    models = args.models or list_models(args.repo)
    out = args.out / datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    scenarios = plan(models, args.quick)
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
                results.append(measure(scenario, target,
                                       f"http://127.0.0.1:{metrics_port}/metrics",
                                       args.seconds, out, args.processes))
    echo = [s for s in scenarios if s.echo]
    if echo:
        with launched([sys.executable, "-m", "loadtests.echo"]) as echo_server:
            results += [measure(s, f"127.0.0.1:{echo_server.port}", None, args.seconds, out,
                                args.processes)
                        for s in echo]
    refs = [in_process(args.repo, m, bs, settings) for m in models for bs in (1, 32)]
    notes = [f"Run {out.name}: {len(scenarios)} scenarios x {args.seconds:g}s, device "
             f"{args.device}, {args.workers} server process(es), {args.processes} Locust "
             "process(es) on the same host as the server; requests are single test digits "
             "unless img/req says otherwise."]
    summary = write_report(out, results, refs, ratios(results, refs), notes)
    print(summary.read_text().split("## onnxruntime")[0])
    print(f"report: {summary}")
    return 0 if all(r.stats.failures == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
