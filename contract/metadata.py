"""The metadata contract shared by training, export and the service.

Defined once here and imported by all three stages. It imports pydantic only, never
torch, so the serving image can read a model's metadata from its ONNX file alone.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION: Literal[1] = 1
ONNX_METADATA_KEY = "cnnserve.metadata"
"""Key under which export stores `OnnxModelMetadata` JSON in the ONNX `metadata_props`."""
MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
"""Model names become repository folder names, so nothing that could leave the folder."""

ArchKwarg = int | float | str | bool


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Preprocessing(_Frozen):
    """How a raw image becomes the model's input tensor; serving must repeat it exactly.

    Images are converted to `color` with PIL, resized with PIL's bilinear filter to
    `height` x `width`, scaled by 1/255 and normalised per channel, NCHW float32.
    """

    color: Literal["L", "RGB"]
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    resize: Literal["pil-bilinear"] = "pil-bilinear"
    mean: tuple[float, ...]
    std: tuple[float, ...]
    layout: Literal["NCHW"] = "NCHW"

    @property
    def channels(self) -> int:
        return 1 if self.color == "L" else 3

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image, without the batch dimension."""
        return (self.channels, self.height, self.width)

    @model_validator(mode="after")
    def _per_channel_stats(self) -> Preprocessing:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"mean/std need one value per channel: expected {self.channels} for "
                f"color {self.color!r}, got mean={self.mean} std={self.std}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        return self


class Recipe(_Frozen):
    """The optimisation choices a training run makes; `TrainConfig` extends them with what
    to train, and `TrainingRecipe` records them with what the run applied."""

    optimizer: Literal["sgd", "adamw"]
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    epochs: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    augment: bool = True
    seed: int = 0


class TrainingRecipe(Recipe):
    """The choices that produced the weights, kept so a run can be reproduced and judged."""

    init: str
    early_stopping_patience: int | None = None
    average_last: int = 0
    """The last N epochs' weights are averaged into the checkpoint (0: best epoch kept);
    the window used, at most a third of `epochs`."""


class ModelMetadata(_Frozen):
    """Everything a later stage needs to rebuild, export or serve a trained model."""

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(pattern=MODEL_NAME_PATTERN)
    arch: str
    arch_kwargs: dict[str, ArchKwarg]
    preprocessing: Preprocessing
    class_names: tuple[str, ...] = Field(min_length=2)
    dataset: str
    recipe: TrainingRecipe
    epochs_trained: int = Field(ge=0)
    best_epoch: int = Field(ge=0)
    averaged: bool = False
    """The weights are the mean of the recipe's last `average_last` epochs (best_epoch is
    then the last epoch); False if early stopping came first."""
    val_accuracy: float = Field(ge=0, le=1)
    test_accuracy: float = Field(ge=0, le=1)
    torch_version: str
    device: str
    created_at: datetime

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class ExportInfo(_Frozen):
    """How an ONNX file was produced from its checkpoint."""

    exporter: str
    opset: int = Field(ge=7)
    precision: Literal["fp32", "fp16"]
    input_name: str
    output_name: str
    source_checkpoint: str
    source_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    torch_version: str
    onnx_version: str
    graph_optimization: Literal["none", "basic"] = "none"
    exported_at: datetime


class OnnxModelMetadata(_Frozen):
    """What export embeds in every ONNX file under `ONNX_METADATA_KEY`."""

    model: ModelMetadata
    export: ExportInfo
