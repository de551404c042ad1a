"""`python -m loadtests.peers`: the service against Triton and MLServer, in one run.

Installs the peers into virtual environments of their own (`.venv-peers/`, pinned by
`loadtests/peers-*.txt`; not part of `make test`), serves the same model.onnx files with
the same onnxruntime session options and batching knobs (max batch 32, 2 ms delay where
the server batches by delay), and drives each server in turn with the same closed-loop
gRPC client (`loadtests.perf.closed_loop`), perf_analyzer beside it where the server
answers Triton's ModelConfig. Writes `reports/peers-<timestamp>/peers.md`.

- cnnserve: this service, default settings (the budget batching rule).
- Triton + Python: Triton 2.5x as bundled in nvidia-pytriton 0.7, its dynamic batcher
  feeding a Python function that calls onnxruntime.
- MLServer 1.7: a custom runtime calling onnxruntime, adaptive batching.
- echo: `loadtests.echo`, the transport alone (LeNet's shape only).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import sysconfig
import venv
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import grpc

from contract.repository import latest_model_file, list_versions
from contract.table import format_table
from loadtests.bench import in_process
from loadtests.launch import ROOT, Launched, free_port, launched
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


def servers(repo: Path, models: Sequence[str], work: Path) -> list[Server]:
    specs = [f"{m}={latest_model_file(repo, m)}" for m in models]
    ports = [str(free_port()) for _ in range(9)]
    # The Python backend's stub must load the interpreter's own libpython, not the system's.
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return [
        Server("cnnserve", ["-m", "service", "--repo", str(repo), "--port", "0",
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


def executed(address: str, model: str) -> tuple[int, int] | None:
    """The server's (inference_count, execution_count) for `model`, as Triton's
    ModelStatistics reports them; None where the server answers no statistics."""
    from protos import grpc_service_pb2 as pb  # not at import: tests load tritonclient's
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


def mean_batch(before: tuple[int, int] | None, after: tuple[int, int] | None
               ) -> float | None:
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def drive(server: Server, launched_server: Launched, repo: Path, models: Sequence[str],
          concurrency: Sequence[int], seconds: float, work: Path) -> list[Row]:
    rows = []
    for model in models:
        if server.models and model not in server.models:
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
    p.add_argument("--models", nargs="*", default=["lenet", "alexnet"])
    p.add_argument("--concurrency", default="1,8,32", help="clients, comma-separated")
    p.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    p.add_argument("--servers", nargs="*", help="default: all (cnnserve, Triton + Python, "
                   "MLServer, echo)")
    p.add_argument("--out", type=Path, default=Path("reports"))
    args = p.parse_args(argv)
    concurrency = [int(c) for c in args.concurrency.split(",")]
    out = args.out / datetime.now().strftime("peers-%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    chosen = [s for s in servers(args.repo, args.models, out)
              if not args.servers or s.name in args.servers]
    rows: list[Row] = []
    for server in chosen:
        print(f"{server.name}:", flush=True)
        python = str(ensure_venv(server.peer)) if server.peer else sys.executable
        with launched([python, *server.args], env=server.env) as running:
            rows += drive(server, running, args.repo, args.models, concurrency, args.seconds,
                          out)
    settings, _ = parse_settings([])
    refs = [in_process(args.repo, m, bs, settings) for m in args.models for bs in (1, 32)]
    names = [s.name for s in chosen]
    lines = [
        "# cnnserve and its peers", "",
        f"Run {out.name}: {args.seconds:g} s per measurement, single-image requests of real "
        "test digits, every server on this host with its client; the same asyncio gRPC "
        "client drives every server (perf_analyzer beside it where the server answers "
        "ModelConfig). req/s, and p50 at 1 client.", "",
        "```", table(rows, names, args.models, concurrency), "```", "",
        "## Every measurement", "", "```", cpu_table(rows, names), "```", "",
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
