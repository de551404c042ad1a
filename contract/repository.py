"""The on-disk model repository: `<repo>/<name>/<version>/model.onnx` plus `<name>/config.json`.

Export writes it, the service reads it. Torch-free: metadata comes from the ONNX file's
`metadata_props` alone. Versions are published by renaming a finished temporary folder,
so a reader never lists a half-written version.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import onnx
from pydantic import BaseModel, ConfigDict, Field, model_validator

from contract.metadata import MODEL_NAME_PATTERN, ONNX_METADATA_KEY, OnnxModelMetadata

MODEL_FILE = "model.onnx"
FP16_MODEL_FILE = "model.fp16.onnx"
CONFIG_FILE = "config.json"
REPORT_FILE = "export_report.json"
_NAME_RE = re.compile(MODEL_NAME_PATTERN)
DEFAULT_PREFERRED_BATCH_SIZES = (8, 16, 32)


class RepositoryError(Exception):
    """The repository, a model in it, or a requested name is not what was expected."""


Datatype = Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32",
                   "INT64", "FP16", "FP32", "FP64", "BYTES"]
"""The Open Inference Protocol's tensor datatypes."""
NUMPY_DTYPES: dict[str, str] = {
    "BOOL": "bool", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
    "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2",
    "FP32": "<f4", "FP64": "<f8"}
"""Each datatype as the little-endian numpy dtype its raw bytes hold (BYTES has none)."""
_ONNX_DATATYPES = {
    onnx.TensorProto.BOOL: "BOOL", onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.UINT16: "UINT16", onnx.TensorProto.UINT32: "UINT32",
    onnx.TensorProto.UINT64: "UINT64", onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.INT16: "INT16", onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT64: "INT64", onnx.TensorProto.FLOAT16: "FP16",
    onnx.TensorProto.FLOAT: "FP32", onnx.TensorProto.DOUBLE: "FP64",
    onnx.TensorProto.STRING: "BYTES"}


class TensorSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=256)
    datatype: Datatype = "FP32"
    shape: tuple[int, ...]
    """Shape without the batch dimension when the model batches (as in Triton's config);
    -1 where any size goes."""

    @model_validator(mode="after")
    def _dims(self) -> TensorSpec:
        if any(d < -1 or d == 0 for d in self.shape):
            raise ValueError(f"tensor {self.name!r}: dims are positive or -1, got "
                             f"{list(self.shape)}")
        return self


class ModelConfig(BaseModel):
    """Per-model serving configuration (the Triton `config.pbtxt` of this project).

    Export writes it whole for the models it makes; for any other ONNX model it is
    derived from the graph (`derive_config`) and `config.json`, if present, overrides
    what it names.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=MODEL_NAME_PATTERN)
    max_batch_size: int = Field(default=32, ge=0)
    """0: the model has no batch dimension; each request runs alone, as in Triton."""
    preferred_batch_sizes: tuple[int, ...] = DEFAULT_PREFERRED_BATCH_SIZES
    """Left out: the defaults that fit under max_batch_size."""
    max_queue_delay_us: int = Field(default=2000, ge=0)
    """Triton's delay, for the `delay` batching rule."""
    latency_budget_ms: float | None = Field(default=None, gt=0, le=600_000)
    """How long a request may take, queue and run; None: the server's default (derived
    from the model's measured cost unless set)."""
    platform: Literal["onnxruntime_onnx", "simulated_accelerator"] = "onnxruntime_onnx"
    """simulated_accelerator: a test backend in the shape of a GPU (a fixed launch time
    plus a small time per image, the GIL released), which answers zeros; for testing
    the server, never chosen by default."""
    simulated_launch_us: int = Field(default=10_000, ge=0, le=10_000_000)
    simulated_per_image_us: int = Field(default=200, ge=0, le=10_000_000)
    inputs: tuple[TensorSpec, ...] = Field(min_length=1, max_length=64)
    outputs: tuple[TensorSpec, ...] = Field(min_length=1, max_length=64)
    labels: tuple[str, ...] = ()
    """A classifier's class names, one per value of its single output; empty otherwise."""

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for single in ("input", "output"):  # config.json as export wrote it before 2026-11
            if single in data:
                data[single + "s"] = [data.pop(single)]
        if "preferred_batch_sizes" not in data:
            limit = data.get("max_batch_size", cls.model_fields["max_batch_size"].default)
            if isinstance(limit, int):
                data["preferred_batch_sizes"] = tuple(
                    b for b in DEFAULT_PREFERRED_BATCH_SIZES if b <= limit)
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        too_big = [b for b in self.preferred_batch_sizes if not 1 <= b <= self.max_batch_size]
        if too_big:
            raise ValueError(f"preferred_batch_sizes must lie in 1..max_batch_size="
                             f"{self.max_batch_size}, got {too_big}")
        for kind, specs in (("input", self.inputs), ("output", self.outputs)):
            names = [t.name for t in specs]
            if len(set(names)) != len(names):
                raise ValueError(f"{kind} names must be unique, got {names}")
        if self.labels and (len(self.inputs), len(self.outputs)) != (1, 1):
            raise ValueError("labels belong to a classifier: one input and one output")
        if self.labels and self.outputs[0].shape != (len(self.labels),):
            raise ValueError(f"output shape {self.outputs[0].shape} does not match "
                             f"{len(self.labels)} labels")
        return self

    @property
    def batched(self) -> bool:
        return self.max_batch_size > 0


def check_model_name(name: str) -> str:
    """Model names become folder names: refuse anything that could leave the repository."""
    if not _NAME_RE.fullmatch(name):
        raise RepositoryError(f"invalid model name {name!r}: expected 1-64 characters of "
                              "a-z, 0-9, '_', '.', '-', starting with a letter or digit")
    return name


def list_models(repo: Path) -> list[str]:
    """Names of models with at least one published version (`config.json` is optional)."""
    if not repo.is_dir():
        raise RepositoryError(f"model repository {repo} does not exist or is not a folder")
    return sorted(p.name for p in repo.iterdir()
                  if p.is_dir() and _NAME_RE.fullmatch(p.name) and list_versions(repo, p.name))


def list_versions(repo: Path, name: str) -> list[int]:
    """Published versions, oldest first; temporary and foreign folders are not versions."""
    folder = repo / check_model_name(name)
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir()
                  if p.name.isdigit() and not p.name.startswith("0") and (p / MODEL_FILE).is_file())


def version_dir(repo: Path, name: str, version: int) -> Path:
    return repo / check_model_name(name) / str(version)


def latest_model_file(repo: Path, name: str) -> Path:
    """The ONNX file of `name`'s newest published version."""
    return version_dir(repo, name, max(list_versions(repo, name))) / MODEL_FILE


def read_config(repo: Path, name: str) -> ModelConfig:
    """`config.json` as written, whole (what export writes)."""
    path = repo / check_model_name(name) / CONFIG_FILE
    try:
        return ModelConfig.model_validate_json(path.read_text())
    except FileNotFoundError:
        raise RepositoryError(f"model {name!r} has no {CONFIG_FILE} in {path.parent}") from None
    except ValueError as exc:
        raise RepositoryError(f"{path}: invalid model config: {exc}") from exc


def serving_config(repo: Path, name: str, model_file: Path) -> ModelConfig:
    """What the service serves `model_file` as: its graph's inputs and outputs, overridden
    by whatever `config.json` says (all of it, for the models export made)."""
    path = repo / check_model_name(name) / CONFIG_FILE
    given: dict[str, Any] = {}
    if path.is_file():
        try:
            given = json.loads(path.read_text())
        except ValueError as exc:
            raise RepositoryError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(given, dict):
            raise RepositoryError(f"{path}: expected a JSON object, got {type(given).__name__}")
    graph = graph_tensors(model_file)
    batched = None
    if isinstance(given.get("max_batch_size"), int):
        batched = given["max_batch_size"] > 0
    derived = derive_config(graph, batched)
    if "max_batch_size" in given and "preferred_batch_sizes" not in given:
        derived.pop("preferred_batch_sizes", None)
    try:
        config = ModelConfig.model_validate({**derived, **given, "name": name})
    except ValueError as exc:
        raise RepositoryError(f"{path}: invalid model config: {exc}") from exc
    _check_against_graph(config, graph, model_file)
    return config


GraphTensors = dict[str, list[tuple[str, str, list[int]]]]
"""'inputs' and 'outputs' of an ONNX graph: (name, datatype, dims with -1 where symbolic)."""


def graph_tensors(model_file: Path) -> GraphTensors:
    """The inputs (weights left out) and outputs of an ONNX file's graph."""
    try:
        proto = onnx.load(str(model_file), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for damaged files
        raise RepositoryError(f"{model_file}: not a readable ONNX model ({exc})") from exc
    weights = {t.name for t in proto.graph.initializer}
    found: GraphTensors = {"inputs": [], "outputs": []}
    for kind, tensors in (("inputs", proto.graph.input), ("outputs", proto.graph.output)):
        for t in tensors:
            if t.name in weights:
                continue
            kind_of = t.type.WhichOneof("value")
            if kind_of != "tensor_type":
                raise RepositoryError(f"{model_file}: {kind[:-1]} {t.name!r} is a {kind_of}, "
                                      "not a tensor; only tensors can be served")
            elem = t.type.tensor_type.elem_type
            datatype = _ONNX_DATATYPES.get(elem)
            if datatype is None:
                raise RepositoryError(
                    f"{model_file}: {kind[:-1]} {t.name!r} has ONNX element type "
                    f"{onnx.TensorProto.DataType.Name(elem)}, which the inference protocol "
                    "has no datatype for")
            dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1
                    for d in t.type.tensor_type.shape.dim]
            found[kind].append((t.name, datatype, dims))
    return found


def derive_config(graph: GraphTensors, batched: bool | None = None) -> dict[str, Any]:
    """A configuration from the graph alone, as Triton's auto-complete does: a dynamic
    first dimension on every input and output means the model batches (up to the default
    max_batch_size), anything else that it does not (max_batch_size 0)."""
    if batched is None:
        batched = all(dims and dims[0] == -1
                      for tensors in graph.values() for _, _, dims in tensors)
    cut = 1 if batched else 0
    derived: dict[str, Any] = {
        kind: [{"name": n, "datatype": d, "shape": dims[cut:]} for n, d, dims in tensors]
        for kind, tensors in graph.items()}
    if not batched:
        derived.update(max_batch_size=0, preferred_batch_sizes=())
    return derived


def _check_against_graph(config: ModelConfig, graph: GraphTensors, model_file: Path) -> None:
    """Every tensor the config names is in the graph with its datatype and a shape that
    fits, a batching model's graph has a dynamic first dimension, and every graph input
    is configured (onnxruntime needs them all)."""
    for kind, specs in (("inputs", config.inputs), ("outputs", config.outputs)):
        found = {n: (d, dims) for n, d, dims in graph[kind]}
        for spec in specs:
            if spec.name not in found:
                raise RepositoryError(f"{model_file}: config names {kind[:-1]} {spec.name!r}; "
                                      f"the graph's {kind} are {sorted(found)}")
            datatype, dims = found[spec.name]
            expected = [-1, *spec.shape] if config.batched else list(spec.shape)
            fits = len(dims) == len(expected) and all(
                g == -1 or c == -1 or g == c for g, c in zip(dims, expected, strict=True))
            if datatype != spec.datatype or not fits or (config.batched and dims[0] != -1):
                raise RepositoryError(
                    f"{model_file}: {kind[:-1]} {spec.name!r} is {datatype} {dims} in the "
                    f"graph; config says {spec.datatype} {expected} (max_batch_size "
                    f"{config.max_batch_size}: -1 first is the batch dimension)")
    missing = {n for n, _, _ in graph["inputs"]} - {t.name for t in config.inputs}
    if missing:
        raise RepositoryError(f"{model_file}: graph inputs {sorted(missing)} are not in the "
                              "config")


def read_onnx_metadata(path: Path) -> OnnxModelMetadata:
    """The metadata export embedded in an ONNX file; reads the graph, never the weights."""
    meta = find_onnx_metadata(path)
    if meta is None:
        raise RepositoryError(f"{path}: no {ONNX_METADATA_KEY!r} metadata; was it exported by "
                              "`python -m export`?")
    return meta


def find_onnx_metadata(path: Path) -> OnnxModelMetadata | None:
    """As `read_onnx_metadata`, but None for an ONNX model export did not make."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for damaged files
        raise RepositoryError(f"{path}: not a readable ONNX model ({exc})") from exc
    props = {p.key: p.value for p in proto.metadata_props}
    if ONNX_METADATA_KEY not in props:
        return None
    try:
        return OnnxModelMetadata.model_validate_json(props[ONNX_METADATA_KEY])
    except ValueError as exc:
        raise RepositoryError(f"{path}: invalid {ONNX_METADATA_KEY!r} metadata: {exc}") from exc


def write_config(repo: Path, config: ModelConfig) -> None:
    """Atomically replace `<repo>/<name>/config.json`."""
    folder = repo / check_model_name(config.name)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{CONFIG_FILE}.")
    doc = config.model_dump(mode="json")
    for key in _WRITTEN_WHEN_SET:  # a model's own choices, not every model's boilerplate
        if getattr(config, key) == ModelConfig.model_fields[key].default:
            del doc[key]
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, folder / CONFIG_FILE)


_WRITTEN_WHEN_SET = ("latency_budget_ms", "platform", "simulated_launch_us",
                     "simulated_per_image_us")


def publish_version(repo: Path, name: str, files: Mapping[str, Path | bytes],
                    version: int | None = None) -> int:
    """Place `files` as a new version of `name` in one rename; returns the version number.

    `version=None` takes the next free number. An existing version is never overwritten.
    """
    folder = repo / check_model_name(name)
    folder.mkdir(parents=True, exist_ok=True)
    if version is None:
        version = max(list_versions(repo, name), default=0) + 1
    if version < 1:
        raise RepositoryError(f"versions are positive integers, got {version}")
    target = folder / str(version)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=f".staging-{version}-"))
    try:
        for filename, content in files.items():
            if isinstance(content, bytes):
                (staging / filename).write_bytes(content)
            else:
                shutil.copyfile(content, staging / filename)
        os.chmod(staging, 0o755)
        try:
            os.rename(staging, target)  # fails if target exists and is not empty
        except OSError:
            raise RepositoryError(f"{name} version {version} already exists in {repo}") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return version
