"""One onnxruntime session per model instance: where it runs, IOBinding, warm-up."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from contract.repository import NUMPY_DTYPES, ModelConfig
from service.engine.options import DEVICE, EngineOptions
from service.engine.threads import ORT_TYPES, ThreadTrial, fitted_session
from service.memory.cuda import DeviceTensor

log = logging.getLogger(__name__)
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class DeviceError(RuntimeError):
    """The device asked for cannot serve: the process says why in one line and exits 1."""


def _driver_gpus() -> tuple[int, str]:
    """GPUs the NVIDIA driver shows this process, and why none where it shows none ("" if
    it shows some). Asks libcuda, not torch."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0, "no NVIDIA driver here (libcuda.so.1 is not on the library path)"
    count = ctypes.c_int(0)
    code = libcuda.cuInit(0)
    if code == 0:
        code = libcuda.cuDeviceGetCount(ctypes.byref(count))
    if code != 0 or count.value == 0:
        return 0, f"the NVIDIA driver shows no GPU to this process (CUDA driver error {code})"
    return count.value, ""


def gpu_count() -> int:
    """GPUs the NVIDIA driver shows this process (CUDA_VISIBLE_DEVICES applied); 0 where
    there is no driver."""
    return _driver_gpus()[0]


def preload_cuda_libraries() -> None:
    """Load CUDA and cuDNN from the nvidia-* wheels if that is where they are installed:
    a pip-only install has them outside the library path. Where they are missing, the
    reason surfaces in `cuda_unusable_reason`, not here."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as exc:  # missing wheels: the system libraries may still serve
            log.debug("onnxruntime.preload_dlls() did not load: %s", exc)


def cuda_unusable_reason() -> str:
    """Why onnxruntime's CUDA provider cannot run here, in one sentence; "" when it can.
    Checks what onnxruntime itself needs, in the order a user fixes it: the driver and a
    GPU, a GPU build of onnxruntime, then the CUDA libraries its provider links against."""
    gpus, reason = _driver_gpus()
    if not gpus:
        return reason
    if CUDA not in ort.get_available_providers():
        return (f"onnxruntime {ort.__version__} here is a build without the CUDA provider "
                f"(providers: {', '.join(ort.get_available_providers())}); install "
                "cnnserve[serve] for onnxruntime-gpu")
    preload_cuda_libraries()
    provider = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    try:
        ctypes.CDLL(str(provider))
    except OSError as exc:
        return f"onnxruntime's CUDA provider cannot load: {exc}"
    return ""


@dataclass(frozen=True)
class Placement:
    """Where this process's sessions run, decided once at start from `--device`."""

    cuda: bool
    device_id: int = 0
    strict: bool = False
    """`--device cuda[:N]`: a model that CUDA does not take stops the start."""

    @property
    def label(self) -> str:
        return f"cuda:{self.device_id}" if self.cuda else "cpu"


CPU_ONLY = Placement(cuda=False)


def decide_placement(device: str, worker: int, gpus: int, unusable: str) -> Placement:
    """`--device` for worker `worker` of a host with `gpus` GPUs, where `unusable` says why
    CUDA cannot run ("" when it can). `auto` and `cuda` spread workers over the GPUs;
    `cuda:N` pins them to GPU N. DeviceError where CUDA is asked for and cannot be had."""
    match = DEVICE.fullmatch(device)
    if match is None:
        raise DeviceError(f"--device must be auto, cpu, cuda or cuda:N; got {device!r}")
    if device == "cpu" or (device == "auto" and unusable):
        return CPU_ONLY
    if unusable:
        raise DeviceError(f"--device {device}: {unusable}")
    pinned = match.group(1)
    if pinned is not None and int(pinned) >= gpus:
        raise DeviceError(f"--device {device}: this process sees {gpus} GPU(s), numbered "
                          f"0 to {gpus - 1} (CUDA_VISIBLE_DEVICES applies)")
    device_id = int(pinned) if pinned is not None else worker % gpus
    return Placement(cuda=True, device_id=device_id, strict=device != "auto")


def place(device: str, worker: int = 0) -> Placement:
    """`decide_placement` on this host. Where `auto` falls back to the CPU, one warning
    says why."""
    unusable = "" if device == "cpu" else cuda_unusable_reason()
    placement = decide_placement(device, worker, gpu_count() if not unusable else 0,
                                 unusable)
    if device == "auto" and not placement.cuda:
        log.warning("device auto: serving every model on the CPU, since %s", unusable)
    return placement


def cuda_provider_options(settings: EngineOptions, device_id: int) -> dict[str, str]:
    """The CUDA provider's options as the sessions get them: onnxruntime's own defaults
    wherever the settings leave a choice unset (TF32 among them)."""
    options = {"device_id": str(device_id),
               "cudnn_conv_algo_search": settings.cudnn_conv_algo_search,
               "arena_extend_strategy": settings.arena_extend_strategy}
    if settings.gpu_mem_limit_mb:
        options["gpu_mem_limit"] = str(settings.gpu_mem_limit_mb << 20)
    if settings.allow_tf32 is not None:
        options["use_tf32"] = str(int(settings.allow_tf32))
    return options


def nodes_not_on(profile: list[dict[str, Any]], provider: str) -> Counter[str]:
    """Op types, with counts, that an onnxruntime profile shows running on a provider
    other than `provider`: the nodes a CUDA session leaves on the CPU."""
    return Counter(event["args"]["op_name"] for event in profile
                   if event.get("cat") == "Node" and "provider" in event.get("args", {})
                   and event["args"]["provider"] != provider
                   and event["name"].endswith("_kernel_time"))


Tensor = np.ndarray | DeviceTensor
Tensors = dict[str, Tensor]
"""Tensors by name: a request's or a batch's inputs. A DeviceTensor (an input a client
left in CUDA shared memory) reaches a runner only as a batch by itself."""


def on_host(inputs: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
    """`inputs` in host memory: a DeviceTensor copied out once, the others as they are."""
    return {name: np.asarray(value) for name, value in inputs.items()}


class BoundRuns:
    """Runs through IOBinding on `device`: each input copied there once per batch, and the
    outputs written into buffers on the device allocated once per batch size and reused.
    One batch at a time, as each runner's batcher sends them."""

    def __init__(self, session: ort.InferenceSession, output_names: list[str], device: str,
                 device_id: int = 0) -> None:
        self.session, self.device, self.device_id = session, device, device_id
        self.output_names = output_names
        declared = {o.name: o for o in session.get_outputs()}
        self._outputs = [(tuple(d if isinstance(d, int) else -1 for d in declared[n].shape),
                          ORT_TYPES.get(declared[n].type)) for n in output_names]
        self._buffers: dict[int, list[ort.OrtValue]] = {}

    def run(self, inputs: Mapping[str, Tensor]) -> list[np.ndarray]:
        binding = self.session.io_binding()
        rows = 0
        for name, tensor in inputs.items():
            rows = len(tensor) if tensor.ndim else 1
            if (isinstance(tensor, DeviceTensor) and tensor.device == self.device
                    and tensor.device_id == self.device_id):  # bound where it lies
                binding.bind_input(name, self.device, self.device_id, tensor.dtype,
                                   list(tensor.shape), tensor.pointer)
                continue
            value = ort.OrtValue.ortvalue_from_numpy(
                np.ascontiguousarray(np.asarray(tensor)), self.device, self.device_id)
            binding.bind_ortvalue_input(name, value)
        buffers = self._buffers.get(rows)
        if buffers is None:
            buffers = self._allocate(rows)
        if buffers:
            for name, value in zip(self.output_names, buffers, strict=True):
                binding.bind_ortvalue_output(name, value)
        else:  # an output of data-dependent size: onnxruntime allocates it per run
            for name in self.output_names:
                binding.bind_output(name, self.device, self.device_id)
        self.session.run_with_iobinding(binding)
        values = buffers or binding.get_outputs()
        # On the CPU, numpy() views the reused buffer, which the next batch overwrites.
        if self.device == "cpu":
            return [np.array(v.numpy()) for v in values]
        return [v.numpy() for v in values]

    def _allocate(self, rows: int) -> list[ort.OrtValue]:
        shapes = []
        for shape, dtype in self._outputs:
            full = (rows, *shape[1:]) if shape and shape[0] == -1 else shape
            if dtype is None or -1 in full:
                self._buffers[rows] = []
                return []
            shapes.append((full, dtype))
        self._buffers[rows] = [ort.OrtValue.ortvalue_from_shape_and_type(
            list(shape), dtype, self.device, self.device_id) for shape, dtype in shapes]
        return self._buffers[rows]


class ModelRunner:
    """Runs batches through one session; thread-safe for separate batches (onnxruntime
    releases the GIL inside `run`, so several runners compute in parallel). Outputs come
    back in the order of `outputs`."""

    def __init__(self, path: Path, settings: EngineOptions, config: ModelConfig,
                 placement: Placement = CPU_ONLY) -> None:
        self._settings = settings
        self._providers: list[str | tuple[str, dict[str, str]]] = [CPU]
        if placement.cuda:
            preload_cuda_libraries()
            self._providers = [(CUDA, cuda_provider_options(settings, placement.device_id)),
                               CPU]
        self.session = self._session(path, settings.intra_op_threads)
        self.thread_trial: ThreadTrial | None = None
        """The warm-up's timing of a small model on the pool and on one thread, where the
        thread count was left to the service (`threads.fitted_session`)."""
        self.provider = self.session.get_providers()[0]
        self.device_id = placement.device_id if self.provider == CUDA else None
        if placement.cuda and self.provider != CUDA:
            reason = (f"{path}: CUDA was asked for, onnxruntime applied {self.provider} "
                      f"({cuda_unusable_reason() or 'its log above says why'})")
            if placement.strict:
                raise DeviceError(reason)
            log.warning("%s", reason)
        self.config = config
        self.output_names = [t.name for t in config.outputs]
        self.path = path
        self._bound = (BoundRuns(self.session, self.output_names, "cuda", placement.device_id)
                       if self.on_gpu else None)

    def _session(self, path: Path, intra_op_threads: int) -> ort.InferenceSession:
        settings = self._settings
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = settings.inter_op_threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        spin = str(int(settings.allow_spinning))
        opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
        opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
        return ort.InferenceSession(str(path), opts, providers=self._providers)

    @property
    def intra_op_summary(self) -> str:
        """The intra-op threads in words, for the log."""
        n = self.session.get_session_options().intra_op_num_threads
        said = f"{n} intra-op thread{'s' * (n != 1)}" if n else "intra-op threads one per core"
        return said if self.thread_trial is None else f"{said} ({self.thread_trial})"

    @property
    def on_gpu(self) -> bool:
        return self.provider == CUDA

    @property
    def host_compute(self) -> bool:
        """Its runs compute on this host's CPU, with nothing to wait for: a tiny one may
        run on the event loop (never a GPU's, whose run waits on the device)."""
        return not self.on_gpu

    def run(self, inputs: Mapping[str, Tensor]) -> list[np.ndarray]:
        if self._bound is not None:
            return self._bound.run(inputs)
        out: list[np.ndarray] = self.session.run(self.output_names, on_host(inputs))
        return out

    def warmup(self, batch_sizes: list[int]) -> dict[int, float]:
        """`warm_up` on this runner, on a CPU first choosing its intra-op threads where
        they were left to the service; on a GPU, also logs the nodes left on the CPU."""
        if not self.on_gpu and self._settings.intra_op_threads == 0:
            self.session, self.thread_trial = fitted_session(
                self.session, lambda: self._session(self.path, 1))
        timed = warm_up(self, batch_sizes)
        if self.on_gpu:
            off = profiled_placement(self.path, self.session, self.config)
            if off:
                log.warning("%s: %d node(s) run on the CPU under CUDA, with copies each way: "
                            "%s", self.path, sum(off.values()),
                            ", ".join(f"{op} x{n}" for op, n in off.most_common()))
        return timed


def profiled_placement(path: Path, session: ort.InferenceSession, config: ModelConfig,
                       ) -> Counter[str]:
    """Where each node of `path` runs in a session like `session`: a profiled run of one
    row in a throwaway session with the same providers and options. Returns the op
    types that do not run on `session`'s first provider."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with tempfile.TemporaryDirectory(prefix="cnnserve-profile-") as folder:
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(folder, "profile")
        providers = session.get_providers()
        probe = ort.InferenceSession(str(path), opts, providers=providers,
                                     provider_options=[session.get_provider_options()
                                                       .get(p, {}) for p in providers])
        lead = (1,) if config.batched else ()
        probe.run(None, {t.name: np.zeros((*lead, *(max(d, 1) for d in t.shape)),
                                          NUMPY_DTYPES[t.datatype]) for t in config.inputs})
        profile = json.loads(Path(probe.end_profiling()).read_text())
    return nodes_not_on(profile, providers[0])


class SimulatedAccelerator:
    """A test backend in the shape of a GPU, as Triton ships identity and repeat
    backends: each run takes `simulated_launch_us` plus `simulated_per_image_us` per
    image, sleeping (the GIL released, no CPU taken), and answers zeros of the outputs'
    shapes. Chosen by `"platform": "simulated_accelerator"` in config.json, never by
    default; the ONNX file only names the tensors."""

    provider = "simulated_accelerator"
    device_id = None
    on_gpu = False
    host_compute = False
    intra_op_summary = "no intra-op threads (simulated)"

    def __init__(self, path: Path, config: ModelConfig) -> None:
        self.path = path
        self.config = config
        self.launch_s = config.simulated_launch_us / 1e6
        self.per_image_s = config.simulated_per_image_us / 1e6

    def run(self, inputs: Mapping[str, Tensor]) -> list[np.ndarray]:
        rows = len(next(iter(inputs.values()))) if self.config.batched else 1
        time.sleep(self.launch_s + self.per_image_s * rows)
        lead = (rows,) if self.config.batched else ()
        return [np.zeros((*lead, *(max(d, 1) for d in t.shape)), NUMPY_DTYPES[t.datatype])
                for t in self.config.outputs]

    def warmup(self, batch_sizes: list[int]) -> dict[int, float]:
        return warm_up(self, batch_sizes)


Runner = ModelRunner | SimulatedAccelerator
"""What a batcher runs its batches on."""


def make_runner(path: Path, settings: EngineOptions, config: ModelConfig,
                placement: Placement = CPU_ONLY) -> Runner:
    if config.platform == "simulated_accelerator":
        return SimulatedAccelerator(path, config)
    return ModelRunner(path, settings, config, placement)


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
