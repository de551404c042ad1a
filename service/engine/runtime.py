"""One onnxruntime session per model instance: provider choice, IOBinding, warm-up."""

from __future__ import annotations

import ctypes
import logging
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from contract.repository import NUMPY_DTYPES, ModelConfig
from service.engine.options import EngineOptions

log = logging.getLogger(__name__)
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def gpu_count() -> int:
    """GPUs the NVIDIA driver reports; 0 where there is no driver (asks libcuda, not torch)."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if libcuda.cuInit(0) != 0 or libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def cuda_available() -> bool:
    """This onnxruntime build has the CUDA provider and the driver sees a GPU."""
    return CUDA in ort.get_available_providers() and gpu_count() > 0


def wants_cuda(device: str) -> bool:
    """`auto` means CUDA when this onnxruntime build has it and a GPU answers."""
    if device == "cuda":
        if not cuda_available():
            raise RuntimeError(f"device=cuda, but no GPU is usable: {gpu_count()} GPU(s) seen by "
                               f"the driver, onnxruntime providers {ort.get_available_providers()}")
        return True
    return device == "auto" and cuda_available()


def preload_cuda_libraries() -> None:
    """Load CUDA and cuDNN from the nvidia-* wheels if that is where they are installed.

    A CUDA base image has them on the library path already; a pip-only install does not,
    and without this onnxruntime quietly falls back to the CPU.
    """
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as exc:  # missing wheels: the system libraries may still serve
            log.debug("onnxruntime.preload_dlls() did not load: %s", exc)


Tensors = dict[str, np.ndarray]
"""Tensors by name: a request's or a batch's inputs."""


class ModelRunner:
    """Runs batches through one session; thread-safe (onnxruntime releases the GIL inside
    `run`, so several runners compute in parallel). Outputs come back in the order of
    `outputs`."""

    def __init__(self, path: Path, settings: EngineOptions, config: ModelConfig) -> None:
        def session(intra_op_threads: int) -> ort.InferenceSession:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = intra_op_threads
            opts.inter_op_num_threads = settings.inter_op_threads
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            spin = str(int(settings.allow_spinning))
            opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
            opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
            return ort.InferenceSession(str(path), opts, providers=providers)

        providers: list[str | tuple[str, dict[str, str]]] = [CPU]
        if wants_cuda(settings.device):
            preload_cuda_libraries()
            providers = [(CUDA, {"cudnn_conv_algo_search": settings.cudnn_conv_algo_search,
                                 "use_tf32": str(int(settings.allow_tf32))}), CPU]
        self.session = session(settings.intra_op_threads)
        self.provider = self.session.get_providers()[0]
        if settings.device == "cuda" and self.provider != CUDA:
            raise RuntimeError(f"{path}: asked for CUDA, onnxruntime applied {self.provider}")
        self.config = config
        self.output_names = [t.name for t in config.outputs]
        self.path = path

    @property
    def intra_op_summary(self) -> str:
        """The intra-op threads in words, for the log."""
        n = self.session.get_session_options().intra_op_num_threads
        return f"{n} intra-op thread{'s' * (n != 1)}" if n else "intra-op threads one per core"

    @property
    def on_gpu(self) -> bool:
        return self.provider == CUDA

    @property
    def host_compute(self) -> bool:
        """Its runs compute on this host's CPU, with nothing to wait for: a tiny one may
        run on the event loop (never a GPU's, whose run waits on the device)."""
        return not self.on_gpu

    def run(self, inputs: Tensors) -> list[np.ndarray]:
        if not self.on_gpu:
            out: list[np.ndarray] = self.session.run(self.output_names, inputs)
            return out
        # IOBinding: each input is copied to the device once and the outputs land directly
        # in host memory that onnxruntime allocates, with no per-run name lookups or staging.
        binding = self.session.io_binding()
        for name, array in inputs.items():
            binding.bind_cpu_input(name, array)
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return [value.numpy() for value in binding.get_outputs()]

    def warmup(self, batch_sizes: list[int]) -> dict[int, float]:
        """`warm_up` on this runner."""
        return warm_up(self, batch_sizes)


class SimulatedAccelerator:
    """A test backend in the shape of a GPU, as Triton ships identity and repeat
    backends: each run takes `simulated_launch_us` plus `simulated_per_image_us` per
    image, sleeping (the GIL released, no CPU taken), and answers zeros of the outputs'
    shapes. Chosen by `"platform": "simulated_accelerator"` in config.json, never by
    default; the ONNX file only names the tensors."""

    provider = "simulated_accelerator"
    on_gpu = False
    host_compute = False
    intra_op_summary = "no intra-op threads (simulated)"

    def __init__(self, path: Path, config: ModelConfig) -> None:
        self.path = path
        self.config = config
        self.launch_s = config.simulated_launch_us / 1e6
        self.per_image_s = config.simulated_per_image_us / 1e6

    def run(self, inputs: Tensors) -> list[np.ndarray]:
        rows = len(next(iter(inputs.values()))) if self.config.batched else 1
        time.sleep(self.launch_s + self.per_image_s * rows)
        lead = (rows,) if self.config.batched else ()
        return [np.zeros((*lead, *(max(d, 1) for d in t.shape)), NUMPY_DTYPES[t.datatype])
                for t in self.config.outputs]

    def warmup(self, batch_sizes: list[int]) -> dict[int, float]:
        return warm_up(self, batch_sizes)


Runner = ModelRunner | SimulatedAccelerator
"""What a batcher runs its batches on."""


def make_runner(path: Path, settings: EngineOptions, config: ModelConfig) -> Runner:
    if config.platform == "simulated_accelerator":
        return SimulatedAccelerator(path, config)
    return ModelRunner(path, settings, config)


def warm_up(runner: Runner, batch_sizes: list[int]) -> dict[int, float]:
    """Run each batch size twice so no request pays for allocation or cuDNN tuning, and
    time the second run: the first estimates of the model's cost. Inputs with a dimension
    of any size are left to the first request (and the cost to the batches it runs)."""
    config = runner.config
    if any(-1 in t.shape for t in config.inputs):
        return {}
    timed = {}
    for size in batch_sizes if config.batched else [1]:
        lead = (size,) if config.batched else ()
        feeds = {t.name: np.zeros((*lead, *t.shape), NUMPY_DTYPES[t.datatype])
                 for t in config.inputs}
        runner.run(feeds)
        started = time.perf_counter()
        runner.run(feeds)
        timed[size] = time.perf_counter() - started
    return timed
