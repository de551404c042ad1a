"""`python -m loadtests.gpu_check`: the one prepared check for a GPU host.

Each stage runs in a process of its own under a time limit and writes its JSON to
`--out` (default `$OUT`) as soon as it ends, so a stage that hangs or runs over costs
only itself, and whatever ran before is kept:

  environment  nvidia-smi, the driver, onnxruntime's version and providers, why CUDA
               cannot run if it cannot
  models       the quick-preset LeNet, AlexNet and VGG, trained and exported with FP16
               files, unless `--repo` has them already
  tests        tests/service/test_cuda.py (skipped, and so reported, without a GPU)
  in_process   images/s at batch 1/8/32/128: plain `run` against IOBinding, FP32, FP16
  served       each model served by `python -m service`, FP32/FP16 x workers 1/4, at 1, 8,
               32 and 128 single-image clients and 16 clients of 32 images: perf_analyzer
               where installed, the project's asyncio client otherwise
  loadgen      LoadGen's Server scenario (highest valid rate at the p99 bound) per model
  shared_memory  CUDA against system shared memory, one model, the same requests

Every served figure comes with the mean executed batch (the server's statistics), p50
and p99, the provider and file the server reports it served, and the GPU's utilisation
and memory over the measurement (NVML) where there is a GPU.

`--dry-run` runs every stage on the CPU with the smallest loads, which proves the
script itself in a few minutes. docs/results.md says how the wheels travel to a device.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from loadtests.launch import ROOT, free_ports, launched

STAGES = ("environment", "models", "tests", "in_process", "served", "loadgen",
          "shared_memory")
MODELS = ("lenet", "alexnet", "vgg11_bn")


class GpuSampler:
    """GPU utilisation and memory, sampled every 100 ms while a measurement runs (NVML);
    empty where there is no GPU or no NVML."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._handle: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no driver, no GPU, no NVML: nothing to sample
            self._handle = None

    @contextmanager
    def sampling(self) -> Iterator[dict[str, float]]:
        found: dict[str, float] = {}
        self.samples, self._stop = [], threading.Event()
        thread = threading.Thread(target=self._loop, daemon=True)
        if self._handle is not None:
            thread.start()
        yield found
        self._stop.set()
        if self._handle is not None:
            thread.join()
        if self.samples:
            found["gpu_util_mean_pct"] = float(np.mean([s[0] for s in self.samples]))
            found["gpu_memory_max_mib"] = float(max(s[1] for s in self.samples))

    def _loop(self) -> None:
        import pynvml

        while not self._stop.wait(0.1):
            util = pynvml.nvmlDeviceGetUtilizationRates(self._handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(self._handle)
            self.samples.append((float(util.gpu), memory.used / 2**20))


def _device(dry_run: bool) -> str:
    return "cpu" if dry_run else "cuda"


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import importlib.metadata as md

    import onnxruntime as ort

    from service.engine.runtime import cuda_unusable_reason, gpu_count

    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                          "--format=csv,noheader"], capture_output=True, text=True,
                         timeout=30) if _has("nvidia-smi") else None
    return {
        "gpus": smi.stdout.strip().splitlines() if smi and smi.returncode == 0 else [],
        "gpu_count": gpu_count(), "cuda_unusable": cuda_unusable_reason(),
        "onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
        "onnxruntime_distributions": sorted(
            d.metadata["Name"] for d in md.distributions()
            if d.metadata["Name"].lower().startswith("onnxruntime")),
        "python": platform.python_version(), "cpus": os.cpu_count(),
    }


def _has(program: str) -> bool:
    import shutil

    return shutil.which(program) is not None


def models(args: argparse.Namespace) -> dict[str, Any]:
    """Train and export what `--repo` lacks (quick preset, FP16 files included)."""
    missing = [m for m in args.models if not (args.repo / m).is_dir()]
    if missing:
        runs = args.repo.parent / "gpu-check-runs"
        train = [sys.executable, "-m", "training", "--preset", "quick", "--model", *missing,
                 "--out", str(runs)]
        if args.dry_run:
            train += ["--epochs", "1"]
        subprocess.run(train, cwd=ROOT, check=True)
        subprocess.run([sys.executable, "-m", "export", "--all", str(runs), "--repo",
                        str(args.repo), "--fp16"], cwd=ROOT, check=True)
    return {"repo": str(args.repo), "trained": missing,
            "files": sorted(str(p.relative_to(args.repo)) for p in args.repo.rglob("*.onnx"))}


def tests(args: argparse.Namespace) -> dict[str, Any]:
    report = args.out / "test_cuda.xml"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs",
                             "tests/service/test_cuda.py", f"--junitxml={report}"],
                            cwd=ROOT, capture_output=True, text=True)
    return {"returncode": result.returncode, "summary": result.stdout.strip().splitlines()[-3:]}


def in_process(args: argparse.Namespace) -> dict[str, Any]:
    """Images/s of one session, back to back, per batch size: plain `run` against
    IOBinding (device-resident outputs), FP32 and (on CUDA) FP16."""
    import onnxruntime as ort

    from service.engine.options import EngineOptions
    from service.engine.runtime import CPU, CUDA, BoundRuns, cuda_provider_options

    cuda = not args.dry_run
    providers: list[Any] = ([(CUDA, cuda_provider_options(EngineOptions(), 0)), CPU]
                            if cuda else [CPU])
    rows = []
    for model in args.models:
        for file in ("model.onnx", "model.fp16.onnx") if cuda else ("model.onnx",):
            path = args.repo / model / "1" / file
            session = ort.InferenceSession(str(path), providers=providers)
            inp = session.get_inputs()[0]
            outputs = [o.name for o in session.get_outputs()]
            bound = BoundRuns(session, outputs, "cuda" if cuda else "cpu")
            for batch in args.batches:
                feeds = {inp.name: np.random.default_rng(0).standard_normal(
                    (batch, *inp.shape[1:])).astype(np.float32)}
                plain = functools.partial(session.run, outputs, feeds)
                for how, call in (("run", plain), ("iobinding", functools.partial(bound.run,
                                                                                  feeds))):
                    rows.append({"model": model, "file": file, "batch": batch, "how": how,
                                 "provider": session.get_providers()[0],
                                 "images_per_s": batch / _best_time(call, args.seconds)})
                    print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows}


def _best_time(call: Callable[[], object], seconds: float) -> float:
    """The fastest of repeated calls over `seconds`, after two warm-up calls."""
    call(), call()
    best, stop = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < stop:
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return best


@contextmanager
def serving(args: argparse.Namespace, *flags: str, workers: int = 1) -> Iterator[Any]:
    port, metrics, probes, http = free_ports(4)
    cmd = [sys.executable, "-m", "service", "--repo", str(args.repo), "--port", str(port),
           "--metrics-port", str(metrics), "--probe-port", str(probes),
           "--http-port", str(http), "--workers", str(workers), *flags]
    with launched(cmd, processes=workers) as server:
        yield server


def placement(address: str, model: str) -> dict[str, str]:
    """The provider and file the server says it serves `model` from (its ModelConfig)."""
    import grpc

    from protos import grpc_service_pb2 as pb
    from protos import grpc_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        config = pb_grpc.GRPCInferenceServiceStub(channel).ModelConfig(
            pb.ModelConfigRequest(name=model), timeout=10).config
    return {k: v.string_value for k, v in config.parameters.items()}


def served(args: argparse.Namespace) -> dict[str, Any]:
    from loadtests.mlperf import executed, mean_batch
    from loadtests.perf import (
        Load,
        closed_loop,
        measured_with_cpu,
        perf_analyzer,
        perf_analyzer_installed,
        real_inputs,
    )

    sampler = GpuSampler()
    measure: Callable[..., Any] = perf_analyzer if perf_analyzer_installed() else closed_loop
    rows = []
    for precision in args.precisions:
        for workers in args.workers:
            with serving(args, "--device", _device(args.dry_run), "--precision", precision,
                         workers=workers) as server:
                for model in args.models:
                    where = placement(server.address, model)
                    inputs = real_inputs(args.repo, model)
                    for clients, images in [*((c, 1) for c in args.clients), (16, 32)]:
                        load = Load(model, clients, images, args.seconds,
                                    connection_each=workers > 1)
                        extra = ((args.out / "perf_analyzer",)
                                 if measure is perf_analyzer else ())
                        before = executed(server.address, model)
                        with sampler.sampling() as gpu:
                            m = measured_with_cpu(server.proc.pid, measure, server.address,
                                                  inputs, load, *extra)
                        rows.append({
                            "precision": precision, "workers": workers, "model": model,
                            "clients": clients, "images_per_request": images,
                            "client": m.client, "requests_per_s": m.requests_per_s,
                            "images_per_s": m.images_per_s, "p50_ms": m.p50_ms,
                            "p99_ms": m.p99_ms, "errors": m.errors,
                            "mean_batch": mean_batch(before, executed(server.address, model)),
                            "server_cpu_us": m.server_cpu_us, **where, **gpu})
                        print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows}


def loadgen(args: argparse.Namespace) -> dict[str, Any]:
    from loadtests.mlperf import BOUNDS_MS, Target, run, server_peak
    from loadtests.perf import real_inputs

    found: dict[str, Any] = {}
    with serving(args, "--device", _device(args.dry_run)) as server:
        for model in args.models:
            target = Target(server.address, model, real_inputs(args.repo, model),
                            server_pid=server.proc.pid)
            bound = BOUNDS_MS.get(model, 15.0)
            if args.dry_run:  # one low rate: the harness, not a search
                one = run(target, "Server", qps=50, bound_ms=1000, min_queries=100,
                          min_seconds=1)
                found[model] = {"qps": 50, "valid": one.valid, "p99_ms": one.p99_ms,
                                "mean_batch": one.mean_batch}
                continue
            offline = run(target, "Offline", min_queries=args.min_queries)
            top = server_peak(target, bound, offline.qps, min_queries=args.min_queries)
            found[model] = {"offline_qps": offline.qps, "peak_qps": top.qps,
                            "bound_ms": bound, "runs": [asdict(r) for r in top.runs],
                            **placement(server.address, model)}
            print(json.dumps({model: found[model]["peak_qps"]}), flush=True)
    return found


def shared_memory(args: argparse.Namespace) -> dict[str, Any]:
    """The same requests with tensors in system shared memory and, where the server
    advertises it, in CUDA shared memory (allocated and exported with libcudart)."""
    import ctypes
    import uuid

    import tritonclient.grpc as triton
    import tritonclient.utils.shared_memory as shm

    from loadtests.perf import real_inputs
    from service.memory.cuda import _IpcHandle, _load_cudart

    model = args.models[0]
    x = real_inputs(args.repo, model).images[:8].astype(np.float32)
    found: dict[str, Any] = {}
    with serving(args, "--device", _device(args.dry_run)) as server:
        client = triton.InferenceServerClient(server.address)
        extensions = client.get_server_metadata().extensions
        out_bytes = 8 * 10 * 4

        def timed(region_in: str, region_out: str) -> dict[str, float]:
            tensor = triton.InferInput("input", list(x.shape), "FP32")
            tensor.set_shared_memory(region_in, x.nbytes)
            wanted = triton.InferRequestedOutput("logits")
            wanted.set_shared_memory(region_out, out_bytes)
            times = []
            stop = time.perf_counter() + args.seconds
            while time.perf_counter() < stop:
                started = time.perf_counter()
                client.infer(model, [tensor], outputs=[wanted])
                times.append(time.perf_counter() - started)
            ms = np.percentile(np.asarray(times) * 1e3, [50, 99])
            return {"requests": len(times), "p50_ms": float(ms[0]), "p99_ms": float(ms[1])}

        key = f"/gpu-check-{uuid.uuid4().hex[:8]}"
        handles = [shm.create_shared_memory_region("in", key, x.nbytes),
                   shm.create_shared_memory_region("out", key + "o", out_bytes)]
        try:
            shm.set_shared_memory_region(handles[0], [x])
            client.register_system_shared_memory("in", key, x.nbytes)
            client.register_system_shared_memory("out", key + "o", out_bytes)
            found["system"] = timed("in", "out")
            client.unregister_system_shared_memory()
        finally:
            for handle in handles:
                shm.destroy_shared_memory_region(handle)
        if "cuda_shared_memory" not in extensions:
            found["cuda"] = {"skipped": "the server does not advertise cuda_shared_memory"}
            return found
        cudart = _load_cudart()
        assert cudart is not None
        cudart.cudaMalloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
        cudart.cudaFree.argtypes = [ctypes.c_void_p]
        cudart.cudaIpcGetMemHandle.argtypes = [ctypes.POINTER(_IpcHandle), ctypes.c_void_p]
        buffers = [ctypes.c_void_p(), ctypes.c_void_p()]
        try:
            for name, buffer, size in (("gin", buffers[0], x.nbytes),
                                       ("gout", buffers[1], out_bytes)):
                assert cudart.cudaMalloc(ctypes.byref(buffer), size) == 0
                handle = _IpcHandle()
                assert cudart.cudaIpcGetMemHandle(ctypes.byref(handle), buffer) == 0
                import base64

                client.register_cuda_shared_memory(name, base64.b64encode(bytes(handle)), 0,
                                                   size)
            assert cudart.cudaMemcpy(buffers[0], x.ctypes.data, x.nbytes, 1) == 0
            found["cuda"] = timed("gin", "gout")
            client.unregister_cuda_shared_memory()
        finally:
            for buffer in buffers:
                cudart.cudaFree(buffer)
    return found


RUNNERS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "environment": environment, "models": models, "tests": tests, "in_process": in_process,
    "served": served, "loadgen": loadgen, "shared_memory": shared_memory}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="every stage on the CPU with the smallest loads (proves the script)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "reports/gpu-check")))
    p.add_argument("--repo", type=Path, default=Path("runs/gpu-check/model_repository"))
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="all stages together; each gets what is left, up to its share")
    p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # a stage's own process
    args = p.parse_args(argv)
    dry = args.dry_run
    args.models = ["lenet"] if dry else list(MODELS)
    args.batches = [1, 8] if dry else [1, 8, 32, 128]
    args.precisions = ["fp32"] if dry else ["fp32", "fp16"]
    args.workers = [1] if dry else [1, 4]
    args.clients = [1, 8] if dry else [1, 8, 32, 128]
    args.seconds = 0.5 if dry else 3.0
    args.min_queries = 2000
    return args


SHARES = {"environment": 0.05, "models": 0.25, "tests": 0.15, "in_process": 0.15,
          "served": 0.45, "loadgen": 0.35, "shared_memory": 0.1}
"""Each stage's most, as a share of the budget (shares overlap: a stage that ends early
leaves its time to the next)."""


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage:  # inside a stage's process: run it, write its JSON
        result = RUNNERS[args.stage](args)
        (args.out / f"{args.stage}.json").write_text(json.dumps(result, indent=1,
                                                                default=str))
        return 0
    deadline = time.monotonic() + args.budget_s
    summary: dict[str, Any] = {"dry_run": args.dry_run, "started": time.strftime("%F %T"),
                               "stages": {}}
    failed = 0
    for stage in args.stages:
        left = deadline - time.monotonic()
        limit = min(left, args.budget_s * SHARES[stage])
        started = time.monotonic()
        if limit < 5:
            outcome = "not run: the budget was spent"
        else:
            cmd = [sys.executable, "-m", "loadtests.gpu_check", "--stage", stage,
                   "--out", str(args.out), "--repo", str(args.repo),
                   *(["--dry-run"] if args.dry_run else [])]
            try:
                code = subprocess.run(cmd, cwd=ROOT, timeout=limit).returncode
                outcome = "ok" if code == 0 else f"failed (exit {code})"
            except subprocess.TimeoutExpired:
                outcome = f"stopped at its {limit:.0f} s limit"
        failed += outcome != "ok"
        summary["stages"][stage] = {"outcome": outcome,
                                    "seconds": round(time.monotonic() - started, 1)}
        print(f"gpu_check {stage}: {outcome} in {summary['stages'][stage]['seconds']} s",
              flush=True)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
