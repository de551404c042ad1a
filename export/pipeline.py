"""One checkpoint -> a verified, published version in the model repository."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from pydantic import BaseModel, ConfigDict

from contract.datasets import load_dataset
from contract.metadata import ExportInfo, ModelMetadata, OnnxModelMetadata
from contract.preprocessing import resize_images, to_input
from contract.repository import (
    FP16_MODEL_FILE,
    MODEL_FILE,
    REPORT_FILE,
    ModelConfig,
    RepositoryError,
    TensorSpec,
    check_model_name,
    list_models,
    list_versions,
    publish_version,
    read_config,
    version_dir,
    write_config,
)
from export.onnx_export import (
    DEFAULT_OPSET,
    EXPORTER,
    INPUT_NAME,
    OUTPUT_NAME,
    ExportError,
    attach_metadata,
    check_graph,
    export_onnx,
    optimize_basic,
    to_fp16,
)
from export.parity import ParityFigures, compare, cpu_session, latency_ms, torch_logits
from training.checkpoint import file_sha256, load_checkpoint

Precision = Literal["fp32", "fp16"]
# (max |logit difference|, minimum top-1 agreement) a variant must meet to be published.
TOLERANCES: dict[Precision, tuple[float, float]] = {"fp32": (1e-4, 1.0), "fp16": (5e-2, 0.995)}


class VariantReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    precision: Precision
    file: str
    size_bytes: int
    max_abs_diff_allowed: float
    min_top1_agreement: float
    parity: list[ParityFigures]
    latency_ms: dict[int, float]
    """onnxruntime CPU latency of one run, by batch size, median."""

    @property
    def passed(self) -> bool:
        return all(p.max_abs_diff <= self.max_abs_diff_allowed
                   and p.top1_agreement >= self.min_top1_agreement for p in self.parity)

    @property
    def worst(self) -> ParityFigures:
        return max(self.parity, key=lambda p: (p.max_abs_diff, -p.top1_agreement))


class ExportReport(BaseModel):
    """export_report.json: the evidence that a published version matches its checkpoint."""

    model: str
    version: int
    checkpoint: str
    source_sha256: str
    exporter: str
    opset: int
    graph_optimization: Literal["none", "basic"]
    optimization_note: str
    dataset: str
    test_images: int
    torch_test_accuracy: float
    variants: list[VariantReport]

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.variants)


class ParityError(ExportError):
    """The export disagrees with its checkpoint; carries the report that shows by how much."""

    def __init__(self, report: ExportReport) -> None:
        failed = [v for v in report.variants if not v.passed]
        details = "; ".join(
            f"{v.precision}: max|diff| {v.worst.max_abs_diff:.3g} (allowed "
            f"{v.max_abs_diff_allowed:g}), top-1 agreement {v.worst.top1_agreement:.2%} (needed "
            f"{v.min_top1_agreement:.1%}) at batch {v.worst.batch_size}" for v in failed)
        super().__init__(f"refusing to publish {report.model}: the ONNX graph disagrees with "
                         f"{report.checkpoint}: {details}")
        self.report = report


def _verify(proto: onnx.ModelProto, blob: bytes, precision: Precision, file: str,
            reference: np.ndarray, x: np.ndarray, labels: np.ndarray, meta: ModelMetadata
            ) -> VariantReport:
    check_graph(proto, meta.preprocessing.input_shape, meta.num_classes)
    session = cpu_session(blob)
    atol, agreement = TOLERANCES[precision]
    return VariantReport(
        precision=precision, file=file, size_bytes=len(blob), max_abs_diff_allowed=atol,
        min_top1_agreement=agreement, parity=compare(reference, session, x, labels),
        latency_ms={bs: latency_ms(session, x, bs) for bs in (1, 32)})


def _serving_config(name: str, meta: ModelMetadata, max_batch_size: int) -> ModelConfig:
    return ModelConfig(
        name=name, max_batch_size=max_batch_size,
        inputs=(TensorSpec(name=INPUT_NAME, shape=meta.preprocessing.input_shape),),
        outputs=(TensorSpec(name=OUTPUT_NAME, shape=(meta.num_classes,)),),
        labels=meta.class_names)


def _ensure_config(repo: Path, fresh: ModelConfig) -> None:
    """Write the model's config, or check that a new version fits the one already there."""
    if not (repo / fresh.name / "config.json").is_file():
        write_config(repo, fresh)
        return
    current = read_config(repo, fresh.name)
    if (current.inputs, current.outputs, current.labels) != (fresh.inputs, fresh.outputs,
                                                             fresh.labels):
        def shapes(config: ModelConfig) -> str:
            return (f"inputs {[list(t.shape) for t in config.inputs]}, outputs "
                    f"{[list(t.shape) for t in config.outputs]} and labels {list(config.labels)}")

        raise RepositoryError(f"model {fresh.name!r} is configured for {shapes(current)}; this "
                              f"checkpoint has {shapes(fresh)}: export it under a new --name")


def find_published(checkpoint: Path, repo: Path) -> tuple[str, int] | None:
    """The (model, version) already exported from this exact checkpoint file, if any."""
    if not repo.is_dir():
        return None
    digest = file_sha256(checkpoint)
    for name in list_models(repo):
        for version in list_versions(repo, name):
            report = version_dir(repo, name, version) / REPORT_FILE
            if report.is_file() and \
                    json.loads(report.read_text()).get("source_sha256") == digest:
                return name, version
    return None


def export_checkpoint(checkpoint: Path, repo: Path, name: str | None = None,
                      version: int | None = None, opset: int = DEFAULT_OPSET,
                      fp16: bool = False, optimize: bool = False, data_dir: Path | None = None,
                      max_batch_size: int = 32) -> ExportReport:
    """Export, validate against PyTorch on the test split, and publish; raises ParityError."""
    model, meta = load_checkpoint(checkpoint)
    name = check_model_name(name or meta.name)
    published = list_versions(repo, name)
    if version is None:
        version = max(published, default=0) + 1
    elif version in published:
        raise RepositoryError(f"{name} version {version} already exists in {repo}")
    prep = meta.preprocessing
    test = load_dataset(meta.dataset, data_dir).test
    x = to_input(resize_images(test.images, prep.color, prep.height, prep.width), prep)
    reference = torch_logits(model, x).astype(np.float64)
    torch_accuracy = float(np.mean(reference.argmax(1) == test.labels))

    def stamp(proto: onnx.ModelProto, precision: Precision,
              optimization: Literal["none", "basic"]) -> onnx.ModelProto:
        info = ExportInfo(
            exporter=EXPORTER, opset=opset, precision=precision, input_name=INPUT_NAME,
            output_name=OUTPUT_NAME, source_checkpoint=checkpoint.name,
            source_sha256=file_sha256(checkpoint), torch_version=meta.torch_version,
            onnx_version=onnx.__version__, graph_optimization=optimization,
            exported_at=datetime.now(UTC))
        return attach_metadata(proto, OnnxModelMetadata(model=meta, export=info))

    graph = export_onnx(model, meta, opset)
    optimization: Literal["none", "basic"] = "none"
    note = "not requested"
    if optimize:
        candidate = stamp(optimize_basic(graph), "fp32", "basic")
        trial = _verify(candidate, candidate.SerializeToString(), "fp32", MODEL_FILE, reference,
                        x, test.labels, meta)
        if trial.passed:
            graph, optimization, note = candidate, "basic", "basic-level graph kept: parity holds"
        else:
            note = (f"basic-level graph dropped: max|diff| {trial.worst.max_abs_diff:.3g} "
                    f"breaks parity")
    fp32 = stamp(graph, "fp32", optimization)
    variants: list[tuple[Precision, str, onnx.ModelProto]] = [("fp32", MODEL_FILE, fp32)]
    if fp16:
        variants.append(("fp16", FP16_MODEL_FILE, stamp(to_fp16(fp32), "fp16", optimization)))
    blobs = {file: proto.SerializeToString() for _, file, proto in variants}
    reports = [_verify(proto, blobs[file], precision, file, reference, x, test.labels, meta)
               for precision, file, proto in variants]
    report = ExportReport(
        model=name, version=version, checkpoint=str(checkpoint),
        source_sha256=file_sha256(checkpoint), exporter=EXPORTER, opset=opset,
        graph_optimization=optimization, optimization_note=note, dataset=meta.dataset,
        test_images=len(x), torch_test_accuracy=torch_accuracy, variants=reports)
    if not report.passed:
        raise ParityError(report)
    _ensure_config(repo, _serving_config(name, meta, max_batch_size))
    files: dict[str, Path | bytes] = dict(blobs)
    files[REPORT_FILE] = report.model_dump_json(indent=2).encode()
    publish_version(repo, name, files, version)
    return report
