"""The models a server process serves: newest version of each, its sessions and batcher.

A model that cannot be served (damaged file, metadata that contradicts its config)
is kept in the set as not ready, with the reason, while the others serve.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from contract.metadata import OnnxModelMetadata
from contract.repository import (
    FP16_MODEL_FILE,
    MODEL_FILE,
    NUMPY_DTYPES,
    ModelConfig,
    RepositoryError,
    TensorSpec,
    find_onnx_metadata,
    list_models,
    list_versions,
    serving_config,
    version_dir,
)
from service.engine.batcher import DynamicBatcher
from service.engine.batching import BatchPolicy, resolve_policy
from service.engine.options import EngineOptions
from service.engine.runtime import CPU_ONLY, CUDA, DeviceError, Placement, make_runner
from service.observability.gpu_metrics import process_gpu_memory_bytes
from service.observability.metrics import Metrics, ModelStats
from service.status import shown

log = logging.getLogger(__name__)


class ModelNotFoundError(LookupError):
    pass


@dataclass(frozen=True, slots=True)
class InputLayout:
    """One input as a request must send it, worked out once per model version."""

    spec: TensorSpec
    batched: bool
    """Requests send rows of it: its first dimension is the batch's."""
    shape: tuple[int, ...]
    """Its whole shape: -1 first for the batch dimension where the model batches, and -1
    where any size goes."""
    dtype: np.dtype
    """The little-endian numpy type its raw bytes hold."""
    tail: tuple[int, ...] | None
    """The dims past the batch dimension (all of them, if the model does not batch) when
    none is -1: a request's shape is then checked by one comparison."""
    row_bytes: int
    """Bytes per row (per request, if the model does not batch) when `tail` is set."""


@dataclass
class ServedModel:
    """One version of a model as it is served: what it takes, how it batches, its runs."""

    name: str
    version: int
    """The repository's version folder this was loaded from."""
    config: ModelConfig
    policy: BatchPolicy
    """How its requests batch, the settings' overrides applied to config.json."""
    metadata: OnnxModelMetadata | None = None
    """What export embedded; None for ONNX models made elsewhere (no classifier API)."""
    batcher: DynamicBatcher | None = None
    provider: str = ""
    """The onnxruntime execution provider its sessions run on (what onnxruntime applied)."""
    device_id: int | None = None
    """The GPU its sessions run on; None on the CPU."""
    file: str = ""
    reason: str = ""
    """Why the model is not ready; empty when it is."""
    stats: ModelStats = field(default_factory=ModelStats)

    @property
    def ready(self) -> bool:
        return self.batcher is not None and not self.reason

    @property
    def max_batch_size(self) -> int:
        return self.policy.max_batch_size

    @cached_property
    def output_names(self) -> tuple[str, ...]:
        """Its outputs' names, in the configured order (read once it serves)."""
        return tuple(t.name for t in self.config.outputs)

    @cached_property
    def inputs(self) -> dict[str, InputLayout]:
        """Its inputs by name, in the configured order (read once it serves)."""
        layouts = {}
        batched = self.config.batched
        for spec in self.config.inputs:
            dtype = np.dtype(NUMPY_DTYPES.get(spec.datatype, "V1"))
            fixed = -1 not in spec.shape
            row = int(np.prod(spec.shape)) * dtype.itemsize
            layouts[spec.name] = InputLayout(
                spec, batched, ((-1,) if batched else ()) + spec.shape, dtype,
                spec.shape if fixed else None, row if fixed else 0)
        return layouts


class ModelSet:
    """The model served under each name; hot reload swaps entries, requests look them up."""

    def __init__(self, models: Iterable[ServedModel] = (), require_any: bool = True) -> None:
        self._models = {m.name: m for m in models}
        self._require_any = require_any
        """Not ready while empty (false in explicit model control, which may start empty)."""

    def get(self, name: str, version: str = "") -> ServedModel:
        """The served model, or ModelNotFoundError saying what is served instead."""
        model = self._models.get(name)
        if model is None:
            raise ModelNotFoundError(f"unknown model {shown(name)}; served models: "
                                     f"{', '.join(sorted(self._models)) or 'none'}")
        if version and version != str(model.version):
            raise ModelNotFoundError(f"model {shown(name)} has no served version {shown(version)}; "
                                     f"served version: {model.version}")
        return model

    def current(self, name: str) -> ServedModel | None:
        return self._models.get(name)

    def __iter__(self) -> Iterator[ServedModel]:
        """Every model, by name."""
        return iter(sorted(self._models.values(), key=lambda m: m.name))

    def names(self) -> set[str]:
        return set(self._models)

    def put(self, model: ServedModel) -> None:
        """Serve `model` under its name from now on (the caller retires the one it replaces)."""
        self._models[model.name] = model

    def remove(self, name: str) -> ServedModel:
        return self._models.pop(name)

    @property
    def all_ready(self) -> bool:
        return (bool(self._models) or not self._require_any) and all(
            m.ready for m in self._models.values())

    async def close(self) -> None:
        for model in self._models.values():
            if model.batcher is not None:
                await model.batcher.close()


def _check_against_config(meta: OnnxModelMetadata, config: ModelConfig, path: Path) -> None:
    shapes = ([t.shape for t in config.inputs], [t.shape for t in config.outputs])
    expected = (shapes, config.labels)
    found = (([meta.model.preprocessing.input_shape], [(meta.model.num_classes,)]),
             meta.model.class_names)
    if expected != found:
        raise RepositoryError(f"{path}: model has input {found[0][0][0]}, "
                              f"{meta.model.num_classes} classes; config.json says inputs "
                              f"{shapes[0]}, outputs {shapes[1]}, {len(config.labels)} labels")


def _served_config(repo: Path, name: str, path: Path) -> tuple[ModelConfig,
                                                                OnnxModelMetadata | None]:
    """The model's configuration, and its export metadata if export made it."""
    config = serving_config(repo, name, path)
    bytes_tensors = [t.name for t in (*config.inputs, *config.outputs)
                     if t.datatype == "BYTES"]
    if bytes_tensors:
        raise RepositoryError(f"{path}: tensors {bytes_tensors} are BYTES (strings), which "
                              "this server does not serve")
    meta = find_onnx_metadata(path)
    if meta is not None:
        _check_against_config(meta, config, path)
    return config, meta


def load_model(settings: EngineOptions, name: str, executor: Executor, metrics: Metrics,
               placement: Placement = CPU_ONLY, fatal: bool = False) -> ServedModel:
    """The newest version of `name`, ready to serve, or unready with the reason. With
    `fatal` (at start), a DeviceError stops the start instead."""
    repo = settings.repo
    version = max(list_versions(repo, name))
    folder = version_dir(repo, name, version)
    precision = settings.overrides(name).precision or settings.precision
    fp16 = precision == "fp16" and placement.cuda
    path = folder / (FP16_MODEL_FILE if fp16 else MODEL_FILE)
    served = ServedModel(name, version, _FALLBACK_CONFIG.model_copy(update={"name": name}),
                         resolve_policy(name, _FALLBACK_CONFIG, settings))
    gpu_before = process_gpu_memory_bytes(os.getpid()) if placement.cuda else None
    try:
        if precision == "fp16" and not (folder / FP16_MODEL_FILE).is_file():
            raise RepositoryError(f"precision fp16 serves {FP16_MODEL_FILE}, which {folder} "
                                  "does not have (export it with --fp16)")
        config, served.metadata = _served_config(repo, name, path)
        served.config = config
        policy = served.policy = resolve_policy(name, config, settings)
        runners = [make_runner(path, settings, config, placement)
                   for _ in range(policy.instances)]
        if path.name == FP16_MODEL_FILE and runners[0].provider != CUDA:
            log.warning("model %s: FP16 runs on CUDA only, and onnxruntime applied %s: "
                        "serving %s", name, runners[0].provider, MODEL_FILE)
            path = folder / MODEL_FILE
            runners = [make_runner(path, settings, config, placement)
                       for _ in range(policy.instances)]
        warmed: dict[int, float] = {}
        if settings.warmup:
            for runner in runners:
                warmed = runner.warmup(list(range(1, policy.max_batch_size + 1))) or warmed
    except Exception as exc:  # any failure leaves this model unready, not the server down
        if fatal and isinstance(exc, DeviceError):
            raise
        served.reason = str(exc)
        log.error("model %s version %s not served: %s", name, version, exc)
        return served
    served.batcher = DynamicBatcher(name, runners, executor, policy, metrics, served.stats,
                                    str(version), warmed)
    served.provider, served.file = runners[0].provider, path.name
    served.device_id = runners[0].device_id
    metrics.model_placed(name, str(version), served.provider, served.file)
    gpu_after = process_gpu_memory_bytes(os.getpid()) if runners[0].on_gpu else None
    if gpu_before is not None and gpu_after is not None:  # models load one at a time
        metrics.model_gpu_memory(name, str(version), gpu_after - gpu_before)
    budget = served.batcher.budget_s
    log.info("model %s version %s ready: %s on %s, %d instance(s), %s, %s, %s", name, version,
             path.name, served.provider + (f" (GPU {served.device_id})"
                                           if served.device_id is not None else ""),
             len(runners), runners[0].intra_op_summary,
             f"max batch {policy.max_batch_size}" if config.batched else "no batching",
             f"delay {round(policy.max_queue_delay_s * 1e6)}us" if budget is None else
             f"latency budget {budget * 1e3:.1f} ms"
             + (" (derived from its cost)" if policy.budget_s is None else ""))
    return served


_FALLBACK_CONFIG = ModelConfig(name="unserved", inputs=(TensorSpec(name="input", shape=(1,)),),
                               outputs=(TensorSpec(name="output", shape=(1,)),))
"""Stands for the configuration of a model that could not be read, so that it is listed
(unready, with its reason) rather than missing."""


def load_models(settings: EngineOptions, executor: Executor, metrics: Metrics,
                placement: Placement = CPU_ONLY) -> ModelSet:
    """Every model in the repository (in explicit model control, those `load_model`
    names); raises RepositoryError if the repository is unusable, and DeviceError if a
    model will not run where `--device cuda` asks."""
    names = list_models(settings.repo)
    if settings.model_control_mode == "explicit":
        missing = set(settings.load_model) - set(names) - {"*"}
        if missing:
            raise RepositoryError(f"--load-model {', '.join(sorted(missing))}: not in "
                                  f"{settings.repo} (models there: {', '.join(names) or 'none'})")
        if "*" not in settings.load_model:
            names = [n for n in names if n in settings.load_model]
        return ModelSet((load_model(settings, name, executor, metrics, placement, fatal=True)
                         for name in names), require_any=False)
    if not names:
        raise RepositoryError(f"no models in {settings.repo}: export some with "
                              "`python -m export --all RUN_DIR --repo "
                              f"{settings.repo}`")
    return ModelSet(load_model(settings, name, executor, metrics, placement, fatal=True)
                    for name in names)
