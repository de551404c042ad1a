"""`python -m loadtests.scaleout`: the service across `--workers` counts, driven by perf_analyzer.

Made for the GPU machine (16 cores, one GPU): for each precision and worker count, the
service starts with `--workers N --device cuda --precision P`, perf_analyzer sends
single-image requests at a high concurrency and whole 32-image requests, and the table
sets served images/s against onnxruntime in-process at batch 32 (the ceiling, from the
file the server serves: model.fp16.onnx under `--precision fp16` on CUDA), with p99, the
mean executed batch (the server's statistics) and the file it says it served. Runs on
the CPU too (`--device cpu`), which is how it is tested here. Writes
`reports/scaleout-<timestamp>/scaleout.md`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from contract.repository import list_versions
from contract.table import format_table
from loadtests.bench import in_process
from loadtests.gpu_check import placement
from loadtests.launch import free_port, launched
from loadtests.mlperf import executed, mean_batch
from loadtests.perf import Load, measured_with_cpu, perf_analyzer, real_inputs
from service.app.cli import parse_settings


def served_file(address: str, model: str) -> str:
    return placement(address, model).get("model_file", "?")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.scaleout", description=__doc__)
    p.add_argument("--repo", type=Path, default=Path("runs/demo/model_repository"))
    p.add_argument("--models", nargs="*", default=["lenet", "alexnet"])
    p.add_argument("--workers", default="1,2,4,8", help="server processes, comma-separated")
    p.add_argument("--precisions", default="fp32,fp16")
    p.add_argument("--device", default="cuda", choices=("auto", "cpu", "cuda"))
    p.add_argument("--concurrency", type=int, default=256,
                   help="perf_analyzer's concurrency for single-image requests")
    p.add_argument("--batch-concurrency", type=int, default=16,
                   help="its concurrency for whole 32-image requests")
    p.add_argument("--seconds", type=float, default=9.0, help="per measurement")
    p.add_argument("--out", type=Path, default=Path("reports"))
    args = p.parse_args(argv)
    out = args.out / datetime.now().strftime("scaleout-%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    rows = []
    for precision in args.precisions.split(","):
        settings, _ = parse_settings(["--device", args.device, "--precision", precision])
        ceiling = {m: in_process(args.repo, m, 32, settings).images_per_s for m in args.models}
        for workers in (int(w) for w in args.workers.split(",")):
            cmd = [sys.executable, "-m", "service", "--repo", str(args.repo),
                   "--port", str(free_port()), "--workers", str(workers),
                   "--device", args.device, "--precision", precision,
                   "--metrics-port", str(free_port()), "--probe-port", str(free_port()),
                   "--no-http-port"]
            with launched(cmd, processes=workers) as server:
                for model in args.models:
                    inputs = real_inputs(args.repo, model)
                    version = str(max(list_versions(args.repo, model)))
                    for concurrency, images in ((args.concurrency, 1),
                                                (args.batch_concurrency, 32)):
                        before = executed(server.address, model)
                        m = measured_with_cpu(
                            server.proc.pid, perf_analyzer, server.address, inputs,
                            Load(model, concurrency, images, args.seconds, version,
                                 connection_each=True),
                            out / "perf_analyzer")
                        batch = mean_batch(before, executed(server.address, model))
                        rows.append([precision, str(workers), model,
                                     served_file(server.address, model), str(images),
                                     str(concurrency), f"{m.requests_per_s:,.0f}",
                                     f"{m.images_per_s:,.0f}", f"{m.p50_ms:.2f}",
                                     f"{m.p99_ms:.2f}", f"{batch:.1f}",
                                     f"{m.server_cpu_us:.0f}",
                                     f"{m.images_per_s / ceiling[model]:.2f}"])
                        print("  ".join(rows[-1]), flush=True)
    text = "\n".join([
        "# cnnserve across worker processes", "",
        f"Run {out.name}: device {args.device}, perf_analyzer on the same host, "
        f"{args.seconds:g} s per measurement; the ceiling is onnxruntime in-process at "
        "batch 32 with the served session options.", "", "```",
        format_table(("precision", "workers", "model", "file served", "img/req", "concurrency",
                      "req/s", "img/s", "p50 ms", "p99 ms", "mean batch",
                      "server CPU us/req", "/ in-process batch 32"), rows),
        "```", ""])
    (out / "scaleout.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
