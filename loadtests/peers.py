"""`python -m loadtests.peers`: the service against Triton and MLServer, in one run.

Installs the peers into virtual environments of their own (`.venv-peers/`, pinned by
`loadtests/peers-*.txt`; not part of `make test`), serves the same model.onnx files with
the same onnxruntime session options and batching knobs (max batch 32, 2 ms delay where
the server batches by delay), and drives each server in turn:

- the headline: MLPerf's LoadGen (`loadtests.mlperf`) in its Server scenario, the highest
  valid Poisson rate at each model's p99 bound, with SingleStream's p90 beside it, the
  same grpcio client for every server; and a plot of p99 against the offered rate;
- a guard: the same closed-loop gRPC client (`loadtests.perf.closed_loop`) at fixed
  concurrency, perf_analyzer beside it where the server answers Triton's ModelConfig.

The service also serves `accel`, LeNet's files on the accelerator-shaped test backend
(`"platform": "simulated_accelerator"`: 10 ms a launch, 0.2 ms an image, the shape of a
GPU), at a p99 bound of 50 ms. Writes `reports/peers-<timestamp>/peers.md` and
`p99.png`.

- cnnserve: this service, default settings (the budget batching rule).
- Triton + Python: Triton 2.5x as bundled in nvidia-pytriton 0.7, its dynamic batcher
  feeding a Python function that calls onnxruntime.
- MLServer 1.7: a custom runtime calling onnxruntime, adaptive batching.
- echo: `loadtests.echo`, the transport alone (LeNet's shape only).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from contract.repository import latest_model_file, list_versions
from contract.table import format_table
from loadtests.bench import in_process
from loadtests.launch import ROOT, Launched, free_port, launched
from loadtests.mlperf import (
    BOUNDS_MS,
    DEFAULT_BOUND_MS,
    Peak,
    Run,
    Target,
    executed,
    mean_batch,
    run,
    server_peak,
)
from loadtests.perf import (
    Load,
    Measured,
    closed_loop,
    measured_with_cpu,
    perf_analyzer,
    perf_analyzer_installed,
    real_inputs,
)
from loadtests.report import us_cell
from service.app.cli import parse_settings

VENVS = ROOT / ".venv-peers"
PEERS = ("pytriton", "mlserver")


@dataclass
class Server:
    name: str
    args: list[str]
    """The command after its interpreter."""
    peer: str | None = None
    """The venv (`ensure_venv`) whose interpreter runs it; None: this one."""
    env: dict[str, str] = field(default_factory=dict)
    perf_analyzer: bool = True
    """Answers Triton's ModelConfig and statistics, so perf_analyzer can drive it."""
    models: tuple[str, ...] = ()
    """Empty: every model asked for."""


def ensure_venv(peer: str) -> Path:
    """The peer's interpreter, installing its pinned requirements the first time."""
    home = VENVS / peer
    python = home / "bin" / "python"
    stamp = home / ".requirements"
    wanted = (ROOT / "loadtests" / f"peers-{peer}.txt").read_text()
    if not python.exists() or not stamp.exists() or stamp.read_text() != wanted:
        print(f"installing {peer} into {home} (once)", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(home)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-r",
                        str(ROOT / "loadtests" / f"peers-{peer}.txt")], check=True)
        stamp.write_text(wanted)
    return python


ACCELERATOR = "accel"
ACCELERATOR_BOUND_MS = 50.0


def with_accelerator(repo: Path, work: Path) -> Path:
    """A repository of `repo`'s models (linked) plus ACCELERATOR: LeNet's folder on the
    accelerator-shaped test backend, with its defaults (10 ms + 0.2 ms an image)."""
    out = work / "repository"
    out.mkdir(parents=True)
    for model in repo.iterdir():
        if model.is_dir():
            (out / model.name).symlink_to(model.resolve(), target_is_directory=True)
    shutil.copytree(repo / "lenet", out / ACCELERATOR, symlinks=False)
    config = out / ACCELERATOR / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "name": ACCELERATOR,
                                  "platform": "simulated_accelerator"}, indent=2))
    return out


def servers(repo: Path, models: Sequence[str], work: Path) -> list[Server]:
    specs = [f"{m}={latest_model_file(repo, m)}" for m in models if m != ACCELERATOR]
    ports = [str(free_port()) for _ in range(9)]
    # The Python backend's stub must load the interpreter's own libpython, not the system's.
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return [
        Server("cnnserve", ["-m", "service", "--repo", str(with_accelerator(repo, work)),
                            "--port", "0",
                            "--metrics-port", ports[0], "--probe-port", ports[1],
                            "--http-port", ports[2]]),
        Server("Triton + Python", [
            "-m", "loadtests.peer_servers.pytriton_onnx", *specs,
            "--grpc-port", ports[3], "--http-port", ports[4], "--metrics-port", ports[5]],
            peer="pytriton", env={"PYTHONPATH": path, "LD_LIBRARY_PATH": os.pathsep.join(
                p for p in (libdir, os.environ.get("LD_LIBRARY_PATH", "")) if p)}),
        Server("MLServer", [
            "-m", "loadtests.peer_servers.mlserver_onnx", *specs,
            "--folder", str(work / "mlserver"), "--grpc-port", ports[6],
            "--http-port", ports[7], "--metrics-port", ports[8]],
            peer="mlserver", env={"PYTHONPATH": path}, perf_analyzer=False),
        Server("echo", ["-m", "loadtests.echo"], models=("lenet",)),
    ]


def served_models(server: Server, models: Sequence[str]) -> list[str]:
    """The models of `models` that `server` serves: ACCELERATOR only on the service."""
    return [m for m in models if (not server.models or m in server.models)
            and (m != ACCELERATOR or server.name == "cnnserve")]


@dataclass(frozen=True)
class Judged:
    """One server and model under LoadGen."""

    server: str
    model: str
    peak: Peak
    single: Run
    offline: Run


def judge(server: Server, running: Launched, repo: Path, models: Sequence[str],
          min_queries: int, min_seconds: float) -> list[Judged]:
    """LoadGen's Offline (the first guess), Server search and SingleStream per model."""
    out = []
    for model in served_models(server, models):
        inputs = real_inputs(repo, "lenet" if model == ACCELERATOR else model)
        target = Target(running.address, model, inputs, server_pid=running.proc.pid)
        bound = ACCELERATOR_BOUND_MS if model == ACCELERATOR else BOUNDS_MS.get(
            model, DEFAULT_BOUND_MS)
        offline = run(target, "Offline", min_queries=min_queries, min_seconds=min_seconds)
        print(f"  {server.name} {model}: Offline {offline.qps:.0f} q/s; Server search at "
              f"p99 <= {bound:g} ms", flush=True)
        top = server_peak(target, bound, offline.qps, min_queries=min_queries,
                          min_seconds=min_seconds)
        single = run(target, "SingleStream", min_queries=min(min_queries, 1000),
                     min_seconds=min_seconds)
        print(f"  {server.name} {model}: Server {top.qps:.0f} q/s; SingleStream p90 "
              f"{single.p90_ms:.2f} ms", flush=True)
        out.append(Judged(server.name, model, top, single, offline))
    return out


def judged_table(judged: list[Judged], names: Sequence[str], models: Sequence[str],
                 refs: dict[tuple[str, int], float]) -> str:
    """Highest valid Server rate per model and server, with the ratios the issue asks."""
    found = {(j.server, j.model): j for j in judged}
    head = ["model (p99 bound)", *names, "in-process b1 / b32 img/s",
            *(f"cnnserve / {n}" for n in names if n != "cnnserve")]
    out = []
    for model in models:
        bound = ACCELERATOR_BOUND_MS if model == ACCELERATOR else BOUNDS_MS.get(
            model, DEFAULT_BOUND_MS)
        cells = [f"{found[n, model].peak.qps:,.0f}" if (n, model) in found else ""
                 for n in names]
        ref = (f"{refs[model, 1]:,.0f} / {refs[model, 32]:,.0f}"
               if (model, 1) in refs else "")
        ours = found.get(("cnnserve", model))
        ratios = []
        for n in names:
            if n == "cnnserve":
                continue
            theirs = found.get((n, model))
            ratios.append("" if ours is None or theirs is None or not theirs.peak.qps
                          else f"{ours.peak.qps / theirs.peak.qps:.2f}")
        out.append([f"{model} ({bound:g} ms)", *cells, ref, *ratios])
    return format_table(head, out)


def single_table(judged: list[Judged]) -> str:
    return format_table(
        ("server", "model", "SingleStream p50 ms", "p90 ms", "Offline q/s",
         "Offline mean batch", "server CPU us/query at the peak", "mean batch at the peak"),
        [[j.server, j.model, f"{j.single.p50_ms:.2f}", f"{j.single.p90_ms:.2f}",
          f"{j.offline.qps:,.0f}", f"{j.offline.mean_batch:.1f}",
          _at_peak(j, "server_cpu_us", "{:.0f}"), _at_peak(j, "mean_batch", "{:.1f}")]
         for j in judged])


def _at_peak(judged: Judged, field: str, fmt: str) -> str:
    """`field` of the last valid run at the peak rate (the confirmation)."""
    runs = [r for r in judged.peak.runs if r.valid and r.target_qps == judged.peak.qps]
    value = getattr(runs[-1], field) if runs else float("nan")
    return "" if value != value else fmt.format(value)


def plot_p99(judged: list[Judged], path: Path) -> None:
    """p99 latency against the offered Poisson rate, one line per server and model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({j.model for j in judged})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for j in (j for j in judged if j.model == model):
            runs = sorted(j.peak.runs, key=lambda r: r.target_qps)
            ax.plot([r.target_qps for r in runs], [r.p99_ms for r in runs], "o-",
                    label=j.server)
        ax.axhline(j.peak.bound_ms, color="grey", linestyle="--", label="p99 bound")
        ax.set(title=model, xlabel="offered queries/s (Poisson)", ylabel="p99 ms",
               yscale="log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@dataclass(frozen=True)
class Row:
    server: str
    model: str
    concurrency: int
    images_per_request: int
    client: Measured
    perf_analyzer: Measured | None
    mean_batch: float | None = None
    """Images per executed batch during the asyncio client's run, from the server's own
    ModelStatistics (inference_count / execution_count); None where it keeps none."""


def drive(server: Server, launched_server: Launched, repo: Path, models: Sequence[str],
          concurrency: Sequence[int], seconds: float, work: Path) -> list[Row]:
    rows = []
    for model in served_models(server, models):
        if model == ACCELERATOR:
            continue
        inputs = real_inputs(repo, model)
        version = "1" if server.name == "echo" else str(max(list_versions(repo, model)))
        for c in concurrency:
            load = Load(model, c, 1, seconds, version)
            counts = executed(launched_server.address, model) if server.name != "echo" else None
            client = measured_with_cpu(launched_server.proc.pid, closed_loop,
                                       launched_server.address, inputs, load)
            batch = mean_batch(counts, executed(launched_server.address, model)
                               if counts is not None else None)
            pa = None
            if server.perf_analyzer and perf_analyzer_installed():
                pa = perf_analyzer(launched_server.address, inputs, load, work / "perf")
            rows.append(Row(server.name, model, c, 1, client, pa, batch))
            print(f"  {server.name} {model} c{c}: {client.requests_per_s:.0f} req/s, p50 "
                  f"{client.p50_ms:.2f} ms, {client.server_cpu_us:.0f} us CPU/request"
                  + (f", mean batch {batch:.1f}" if batch is not None else "")
                  + (f"; perf_analyzer {pa.requests_per_s:.0f} req/s" if pa else ""), flush=True)
    return rows


def table(rows: list[Row], names: Sequence[str], models: Sequence[str],
          concurrency: Sequence[int]) -> str:
    head = ["model, clients", *names, *(f"cnnserve / {n}" for n in names if n != "cnnserve")]
    out = []
    for model in models:
        for c in concurrency:
            found = {r.server: r for r in rows if r.model == model and r.concurrency == c}
            cells = []
            for name in names:
                r = found.get(name)
                cells.append("" if r is None else f"{r.client.requests_per_s:,.0f}"
                             + (f" ({r.client.p50_ms:.2f} ms)" if c == 1 else ""))
            ours = found.get("cnnserve")
            for name in names:
                if name == "cnnserve":
                    continue
                r = found.get(name)
                cells.append("" if r is None or ours is None else
                             f"{ours.client.requests_per_s / r.client.requests_per_s:.2f}")
            out.append([f"{model}, {c}", *cells])
    return format_table(head, out)


def cpu_table(rows: list[Row], names: Sequence[str]) -> str:
    out = []
    for r in rows:
        pa = r.perf_analyzer
        out.append([r.server, r.model, str(r.concurrency), f"{r.client.requests_per_s:,.0f}",
                    f"{r.client.p50_ms:.2f}", f"{r.client.p99_ms:.2f}",
                    us_cell(r.client.server_cpu_us), us_cell(r.client.client_cpu_us),
                    "" if r.mean_batch is None else f"{r.mean_batch:.1f}",
                    "" if pa is None else f"{pa.requests_per_s:,.0f} ({pa.p50_ms:.2f} ms)"])
    return format_table(("server", "model", "clients", "req/s", "p50 ms", "p99 ms",
                         "server CPU us/req", "client CPU us/req", "mean batch",
                         "perf_analyzer req/s (p50)"), out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.peers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", type=Path, default=Path("runs/demo/model_repository"))
    p.add_argument("--models", nargs="*", default=["lenet", "alexnet", ACCELERATOR])
    p.add_argument("--concurrency", default="32",
                   help="closed-loop clients, comma-separated (empty: none)")
    p.add_argument("--seconds", type=float, default=10.0, help="per closed-loop point")
    p.add_argument("--no-loadgen", action="store_true", help="the closed loop only")
    p.add_argument("--min-queries", type=int, default=2000, help="per LoadGen run")
    p.add_argument("--min-seconds", type=float, default=5.0, help="per LoadGen run")
    p.add_argument("--servers", nargs="*", help="default: all (cnnserve, Triton + Python, "
                   "MLServer, echo)")
    p.add_argument("--out", type=Path, default=Path("reports"))
    args = p.parse_args(argv)
    concurrency = [int(c) for c in args.concurrency.split(",") if c]
    out = args.out / datetime.now().strftime("peers-%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    chosen = [s for s in servers(args.repo, args.models, out)
              if not args.servers or s.name in args.servers]
    rows: list[Row] = []
    judged: list[Judged] = []
    for server in chosen:
        print(f"{server.name}:", flush=True)
        python = str(ensure_venv(server.peer)) if server.peer else sys.executable
        with launched([python, *server.args], env=server.env) as running:
            if not args.no_loadgen:
                judged += judge(server, running, args.repo, args.models, args.min_queries,
                                args.min_seconds)
            rows += drive(server, running, args.repo, args.models, concurrency, args.seconds,
                          out)
    settings, _ = parse_settings([])
    real = [m for m in args.models if m != ACCELERATOR]
    refs = [in_process(args.repo, m, bs, settings) for m in real for bs in (1, 32)]
    names = [s.name for s in chosen]
    lines = [
        "# cnnserve and its peers", "",
        f"Run {out.name}, every server on this host with its client, single-image queries "
        "of real test digits, the same grpcio client for every server.", ""]
    if judged:
        plot_p99(judged, out / "p99.png")
        lines += [
            "## MLPerf LoadGen, Server scenario: highest valid queries/s", "",
            "Poisson arrivals; valid when p99 is within the bound over at least "
            f"{args.min_queries} queries and none failed; bisected, then confirmed. "
            f"{ACCELERATOR}: the accelerator-shaped backend (10 ms + 0.2 ms an image, "
            "batch-32 capacity 1,951/s). Plot: p99.png.", "",
            "```", judged_table(judged, names, args.models,
                                {(r.model, r.batch_size): r.images_per_s for r in refs}),
            "```", "", "```", single_table(judged), "```", ""]
    if rows:
        lines += [
            "## Closed loop (a guard)", "",
            f"{args.seconds:g} s per point; req/s, and p50 at 1 client.", "",
            "```", table(rows, names, real, concurrency), "```", "",
            "```", cpu_table(rows, names), "```", ""]
    lines += [
        "## onnxruntime in-process (the same session options)", "", "```",
        format_table(("model", "batch", "img/s"),
                     [[r.model, str(r.batch_size), f"{r.images_per_s:,.0f}"] for r in refs]),
        "```", ""]
    report = out / "peers.md"
    report.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"report: {report}")
    return 0 if all(r.client.errors == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
