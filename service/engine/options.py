"""The engine's part of the process's settings: how models load, run, batch and reload.

The app's `ServiceSettings` is made of this model and the edge's; the engine takes an
`EngineOptions`, so it can be loaded, configured and tested without the app's flags and
files. Defaults, bounds and reasons live here, once."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEVICE = re.compile(r"auto|cpu|cuda(?::(\d+))?")
"""What `device` may be; the group is the GPU of `cuda:N`."""


class ModelOverrides(BaseModel):
    """Per-model settings that win over the model's config.json."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int | None = Field(default=None, ge=1)
    max_queue_delay_us: int | None = Field(default=None, ge=0)
    batching: Literal["budget", "delay"] | None = None
    latency_budget_ms: float | None = Field(default=None, gt=0, le=600_000)
    preferred_batch_sizes: tuple[int, ...] | None = None
    max_queue_size: int | None = Field(default=None, ge=1)
    instances: int | None = Field(default=None, ge=1)
    precision: Literal["fp32", "fp16"] | None = None


class EngineOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    repo: Path = Path("model_repository")
    device: str = "auto"
    """auto: CUDA where it can run, else the CPU with one warning saying why; cuda: CUDA or
    exit 1 saying why, with workers spread over the visible GPUs; cuda:N: GPU N only."""
    precision: Literal["fp32", "fp16"] = "fp32"
    """fp16 serves model.fp16.onnx on CUDA; on the CPU, model.onnx. A model without an FP16
    file is not served."""
    intra_op_threads: int = Field(default=0, ge=0)
    """onnxruntime threads per session; 0: one per core, or one for a small model the pool
    does not speed up (`engine.threads`, timed at warm-up)."""
    inter_op_threads: int = Field(default=1, ge=0)
    allow_spinning: bool = False
    """Let idle onnxruntime threads spin: lower latency on a dedicated host, but they take
    CPU from the event loop and other sessions."""
    instances: int = Field(default=1, ge=1, le=64)
    """onnxruntime sessions per model, each running its own batches."""
    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = "HEURISTIC"
    """EXHAUSTIVE benchmarks every convolution per new shape: fastest kernels, slow warm-up."""
    allow_tf32: bool | None = None
    """Let CUDA run FP32 convolutions and GEMMs in TF32 (faster on Ampere and later, ~1e-3
    less exact); unset: onnxruntime's default, which is on."""
    gpu_mem_limit_mb: int = Field(default=0, ge=0)
    """The most each CUDA session's memory arena may hold; 0: no bound but the GPU's."""
    arena_extend_strategy: Literal["kNextPowerOfTwo", "kSameAsRequested"] = "kSameAsRequested"
    """How a CUDA arena grows: by what a run asks for (a served model's batch sizes are
    known and warmed), or in powers of two (onnxruntime's default)."""
    warmup: bool = True
    """Run every batch size the batcher can form before reporting ready."""

    max_batch_size: int | None = Field(default=None, ge=1)
    max_queue_delay_us: int | None = Field(default=None, ge=0)
    batching: Literal["budget", "delay"] = "budget"
    """budget: each batch leaves as soon as it keeps up with the arrivals, or when its
    oldest request can wait no longer within its latency budget; a request that cannot be
    answered within the budget is refused at once (docs/batching.md). delay: Triton's
    dynamic batcher, where the oldest request waits up to max_queue_delay_us for a full
    or preferred batch."""
    latency_budget_ms: float | None = Field(default=None, gt=0, le=600_000)
    """The default latency budget of a model whose config.json sets none; unset: derived
    from each model's measured cost (four runs of its largest batch, at least 50 ms)."""
    max_queue_size: int = Field(default=512, ge=1)
    """Requests waiting per model; beyond it a request is refused with RESOURCE_EXHAUSTED."""
    models: dict[str, ModelOverrides] = Field(default_factory=dict)

    model_control_mode: Literal["none", "poll", "explicit"] = "none"
    """As Triton's: `none` serves the repository as found at start; `poll` also loads new
    versions and models and unloads removed ones every `reload_interval_s`; `explicit`
    loads `load_model` at start and then what RepositoryModelLoad/Unload ask for."""
    load_model: tuple[str, ...] = ()
    """Models `explicit` mode loads at start (`*`: all of them); repeat --load-model."""
    reload_interval_s: float = Field(default=0.0, ge=0)
    """How often `poll` mode reads the repository (0: 15 s, Triton's default). Set alone,
    it turns `poll` mode on, as it did before model_control_mode existed."""

    @property
    def polls(self) -> float:
        """Seconds between repository reads; 0 when the repository is not polled."""
        if self.model_control_mode == "poll":
            return self.reload_interval_s or 15.0
        return self.reload_interval_s if self.model_control_mode == "none" else 0.0

    @field_validator("device")
    @classmethod
    def _one_device(cls, device: str) -> str:
        if DEVICE.fullmatch(device) is None:
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N (N a GPU's number); "
                             f"got {device!r}")
        return device

    def overrides(self, model: str) -> ModelOverrides:
        """Server-wide batching flags, then the model's own entry, over config.json."""
        base = {"max_batch_size": self.max_batch_size,
                "max_queue_delay_us": self.max_queue_delay_us}  # the rest resolve_policy reads
        specific = self.models.get(model, ModelOverrides()).model_dump(exclude_none=True)
        return ModelOverrides(**{**{k: v for k, v in base.items() if v is not None},
                                 **specific})
