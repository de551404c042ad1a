"""Checkpoint -> ONNX graph: export, FP16 conversion, metadata, structural checks.

Exporter: `torch.onnx.export(..., dynamo=True)`, the torch.export-based exporter that
is the default in current torch (the TorchScript one is deprecated). It needs
onnxscript and emits opset 18 or newer; `DEFAULT_OPSET` pins what we test.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from torch import nn

from contract.metadata import ONNX_METADATA_KEY, ModelMetadata, OnnxModelMetadata

DEFAULT_OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
EXPORTER = f"torch.onnx.export(dynamo=True), torch {torch.__version__}"


class ExportError(Exception):
    """The exported graph is not one the service can trust."""


def export_onnx(model: nn.Module, metadata: ModelMetadata, opset: int = DEFAULT_OPSET
                ) -> onnx.ModelProto:
    """FP32 graph with a dynamic batch dimension and stable tensor names."""
    example = torch.zeros(2, *metadata.preprocessing.input_shape)
    batch = torch.export.Dim("batch", min=1, max=65536)
    # The exporter narrates every pass on stdout and warns about its own internals.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(model.eval(), (example,), dynamo=True, opset_version=opset,
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes=({0: batch},), verbose=False)
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    proto = program.model_proto
    names = ([i.name for i in proto.graph.input], [o.name for o in proto.graph.output])
    if names != ([INPUT_NAME], [OUTPUT_NAME]):
        raise ExportError(f"expected graph inputs/outputs ['{INPUT_NAME}'] / ['{OUTPUT_NAME}'], "
                          f"got {names[0]} / {names[1]}")
    return proto


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """FP16 weights and compute with FP32 inputs and outputs, so clients need not change."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    source = onnx.ModelProto()
    source.CopyFrom(proto)  # the converter rewrites its argument in place
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = OnnxModel(convert_float_to_float16(source, keep_io_types=True))
    converted.topological_sort()  # the converter appends its input casts after their users
    result: onnx.ModelProto = converted.model
    return result


def optimize_basic(proto: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's basic (provider-independent) graph rewrites, saved as a graph.

    Basic level only: constant folding, redundant-node removal and Conv+BN fusion run
    anywhere, whereas extended/layout rewrites bind the file to one execution provider.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = str(out)
        ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return onnx.load(str(out))


def attach_metadata(proto: onnx.ModelProto, metadata: OnnxModelMetadata) -> onnx.ModelProto:
    """Embed `metadata` as JSON under `ONNX_METADATA_KEY`, replacing an earlier value."""
    kept = [p for p in proto.metadata_props if p.key != ONNX_METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    proto.metadata_props.add(key=ONNX_METADATA_KEY, value=metadata.model_dump_json())
    proto.producer_name = "cnnserve-export"
    proto.doc_string = (f"{metadata.model.arch} trained on {metadata.model.dataset}, "
                        f"{metadata.export.precision}")
    return proto


def check_graph(proto: onnx.ModelProto, input_shape: tuple[int, ...], num_classes: int) -> None:
    """Full onnx.checker pass, strict shape inference, and the I/O shapes the service expects."""
    try:
        onnx.checker.check_model(proto, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"ONNX validation failed: {exc}") from exc

    def dims(value: onnx.ValueInfoProto) -> list[int | str]:
        return [d.dim_value if d.HasField("dim_value") else d.dim_param
                for d in value.type.tensor_type.shape.dim]

    got_in, got_out = dims(inferred.graph.input[0]), dims(inferred.graph.output[0])
    if (got_in[1:] != list(input_shape) or got_out[1:] != [num_classes]
            or not isinstance(got_in[0], str) or got_in[0] != got_out[0]):
        raise ExportError(f"expected input [batch, {', '.join(map(str, input_shape))}] and "
                          f"output [batch, {num_classes}] with a symbolic batch, got input "
                          f"{got_in} and output {got_out}")
