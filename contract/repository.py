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


class TensorSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    datatype: Literal["FP32"] = "FP32"
    shape: tuple[int, ...]
    """Per-request shape without the batch dimension, as in Triton's config."""


class ModelConfig(BaseModel):
    """Per-model serving configuration (the Triton `config.pbtxt` of this project)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=MODEL_NAME_PATTERN)
    max_batch_size: int = Field(default=32, ge=1)
    preferred_batch_sizes: tuple[int, ...] = DEFAULT_PREFERRED_BATCH_SIZES
    """Left out: the defaults that fit under max_batch_size."""
    max_queue_delay_us: int = Field(default=2000, ge=0)
    input: TensorSpec
    output: TensorSpec
    labels: tuple[str, ...]

    @model_validator(mode="before")
    @classmethod
    def _default_preferred(cls, data: Any) -> Any:
        if isinstance(data, dict) and "preferred_batch_sizes" not in data:
            limit = data.get("max_batch_size", cls.model_fields["max_batch_size"].default)
            if isinstance(limit, int):
                data = {**data, "preferred_batch_sizes": tuple(
                    b for b in DEFAULT_PREFERRED_BATCH_SIZES if b <= limit)}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        too_big = [b for b in self.preferred_batch_sizes if not 1 <= b <= self.max_batch_size]
        if too_big:
            raise ValueError(f"preferred_batch_sizes must lie in 1..max_batch_size="
                             f"{self.max_batch_size}, got {too_big}")
        if self.output.shape != (len(self.labels),):
            raise ValueError(f"output shape {self.output.shape} does not match "
                             f"{len(self.labels)} labels")
        return self


def check_model_name(name: str) -> str:
    """Model names become folder names: refuse anything that could leave the repository."""
    if not _NAME_RE.fullmatch(name):
        raise RepositoryError(f"invalid model name {name!r}: expected 1-64 characters of "
                              "a-z, 0-9, '_', '.', '-', starting with a letter or digit")
    return name


def list_models(repo: Path) -> list[str]:
    """Names of models that have a config and at least one published version."""
    if not repo.is_dir():
        raise RepositoryError(f"model repository {repo} does not exist or is not a folder")
    return sorted(p.name for p in repo.iterdir()
                  if p.is_dir() and _NAME_RE.fullmatch(p.name) and (p / CONFIG_FILE).is_file()
                  and list_versions(repo, p.name))


def list_versions(repo: Path, name: str) -> list[int]:
    """Published versions, oldest first; temporary and foreign folders are not versions."""
    folder = repo / check_model_name(name)
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir()
                  if p.name.isdigit() and not p.name.startswith("0") and (p / MODEL_FILE).is_file())


def version_dir(repo: Path, name: str, version: int) -> Path:
    return repo / check_model_name(name) / str(version)


def read_config(repo: Path, name: str) -> ModelConfig:
    path = repo / check_model_name(name) / CONFIG_FILE
    try:
        return ModelConfig.model_validate_json(path.read_text())
    except FileNotFoundError:
        raise RepositoryError(f"model {name!r} has no {CONFIG_FILE} in {path.parent}") from None
    except ValueError as exc:
        raise RepositoryError(f"{path}: invalid model config: {exc}") from exc


def read_onnx_metadata(path: Path) -> OnnxModelMetadata:
    """The metadata export embedded in an ONNX file; reads the graph, never the weights."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for damaged files
        raise RepositoryError(f"{path}: not a readable ONNX model ({exc})") from exc
    props = {p.key: p.value for p in proto.metadata_props}
    if ONNX_METADATA_KEY not in props:
        raise RepositoryError(f"{path}: no {ONNX_METADATA_KEY!r} metadata; was it exported by "
                              f"`python -m export`? Keys found: {sorted(props)}")
    try:
        return OnnxModelMetadata.model_validate_json(props[ONNX_METADATA_KEY])
    except ValueError as exc:
        raise RepositoryError(f"{path}: invalid {ONNX_METADATA_KEY!r} metadata: {exc}") from exc


def write_config(repo: Path, config: ModelConfig) -> None:
    """Atomically replace `<repo>/<name>/config.json`."""
    folder = repo / check_model_name(config.name)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{CONFIG_FILE}.")
    with os.fdopen(fd, "w") as f:
        f.write(config.model_dump_json(indent=2) + "\n")
    os.replace(tmp, folder / CONFIG_FILE)


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


def read_report(repo: Path, name: str, version: int) -> dict[str, object]:
    return dict(json.loads((version_dir(repo, name, version) / REPORT_FILE).read_text()))
