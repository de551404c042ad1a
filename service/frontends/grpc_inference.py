"""Open Inference Protocol (KServe v2 / Triton) gRPC servicer.

Inputs arrive as `raw_input_contents` (what tritonclient sends) or typed
`contents.fp32_contents`; outputs always go back raw, as Triton answers, because
tritonclient decodes outputs only from `raw_output_contents`.
"""

from __future__ import annotations

import functools
import math

import grpc
import numpy as np

from contract.repository import NUMPY_DTYPES, TensorSpec
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from protos import model_config_pb2 as mc
from service.admission import Call
from service.core import InferenceCore, InferRequest, invalid
from service.engine.models import ServedModel
from service.engine.runtime import Tensors
from service.metrics import Duration
from service.status import shown

SERVER_NAME = "cnnserve"
SERVER_VERSION = "0.1.0"
PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ("model_configuration", "statistics")
"""Triton's protocol extensions this server implements whole (RepositoryIndex is served,
but model_repository also means load and unload, which it does not have yet)."""
_TYPED_FIELDS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
                 "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
                 "UINT16": "uint_contents", "UINT32": "uint_contents",
                 "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents"}
"""Where `InferTensorContents` holds each datatype (FP16 travels raw only)."""
_CONTENTS_DTYPES: dict[str, type] = {
    "bool_contents": np.bool_, "int64_contents": np.int64, "uint64_contents": np.uint64,
    "fp32_contents": np.float32, "fp64_contents": np.float64}
"""The numpy type each field's values fit whole; the 32-bit fields are read as int64 and
range-checked against the narrower datatype."""


def _declared_rows(request: pb.ModelInferRequest) -> int:
    """The batch dimension the request declares (its first input's first dim); 0 when
    there is none (then `_inputs` says what is wrong)."""
    shape = request.inputs[0].shape if request.inputs else ()
    return shape[0] if shape else 0


def _inputs(request: pb.ModelInferRequest, model: ServedModel, call: Call) -> Tensors:
    """The request checked against `model`: its inputs by name, or INVALID_ARGUMENT."""
    config = model.config
    given = [t.name for t in request.inputs]
    if sorted(given) != sorted(t.name for t in config.inputs):
        invalid(f"model {model.name!r} takes inputs {[t.name for t in config.inputs]}, got "
                f"[{', '.join(shown(n, 64) for n in given[:16])}]")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        invalid(f"expected {len(request.inputs)} raw_input_contents entries (one per input), "
                f"got {len(raw)}")
    specs = {t.name: t for t in config.inputs}
    tensors: Tensors = {}
    rows: set[int] = set()
    for i, tensor in enumerate(request.inputs):
        spec = specs[tensor.name]
        shape = _checked_shape(tensor, spec, config.batched)
        if config.batched:
            rows.add(shape[0])
        if raw and tensor.HasField("contents"):
            invalid("send input data either in raw_input_contents or in contents, not both")
        tensors[spec.name] = (_from_raw(raw[i], spec, shape) if raw
                              else _from_contents(tensor, spec, shape))
    if len(rows) > 1:
        invalid(f"every input's first (batch) dimension must be the same, got {sorted(rows)}")
    _check_outputs(request, model)
    return {t.name: tensors[t.name] for t in config.inputs}


def _checked_shape(tensor: pb.ModelInferRequest.InferInputTensor, spec: TensorSpec,
                   batched: bool) -> tuple[int, ...]:
    if tensor.datatype != spec.datatype:
        invalid(f"input {spec.name!r} must have datatype {spec.datatype}, got "
                f"{shown(tensor.datatype, 16)}")
    shape = tuple(tensor.shape)
    expected = ((-1,) if batched else ()) + spec.shape
    fits = len(shape) == len(expected) and all(
        d >= 1 and (e == -1 or d == e) for d, e in zip(shape, expected, strict=True))
    if not fits:
        wanted = ", ".join("N" if (batched and i == 0) else ("*" if e == -1 else str(e))
                           for i, e in enumerate(expected))
        invalid(f"input {spec.name!r} must have shape [{wanted}] (each dim >= 1), got "
                f"{list(shape[:16])}")
    return shape


def _from_raw(raw: bytes, spec: TensorSpec, shape: tuple[int, ...]) -> np.ndarray:
    dtype = np.dtype(NUMPY_DTYPES[spec.datatype])
    needed = math.prod(shape) * dtype.itemsize
    if len(raw) != needed:
        invalid(f"input {spec.name!r} of shape {list(shape)} needs {needed} bytes of "
                f"little-endian {spec.datatype}, got {len(raw)}")
    array = np.frombuffer(raw, dtype=dtype).reshape(shape)
    if spec.datatype == "BOOL" and array.view(np.uint8).max(initial=0) > 1:
        invalid(f"input {spec.name!r} is BOOL: each byte must be 0 or 1")
    return array


def _from_contents(tensor: pb.ModelInferRequest.InferInputTensor, spec: TensorSpec,
                   shape: tuple[int, ...]) -> np.ndarray:
    field = _TYPED_FIELDS.get(spec.datatype)
    if not tensor.HasField("contents"):
        invalid(f"input {spec.name!r} carries no data: fill raw_input_contents"
                + (f" or contents.{field}" if field else ""))
    if field is None:
        invalid(f"{spec.datatype} input {spec.name!r} travels in raw_input_contents only")
    others = [f.name for f, _ in tensor.contents.ListFields() if f.name != field]
    if others:
        invalid(f"{spec.datatype} input data goes in contents.{field}, got {others}")
    values = getattr(tensor.contents, field)
    count = math.prod(shape)
    if len(values) != count:
        invalid(f"input {spec.name!r} of shape {list(shape)} needs {count} {field} values, "
                f"got {len(values)}")
    dtype = np.dtype(NUMPY_DTYPES[spec.datatype])
    array: np.ndarray = np.asarray(values, dtype=_CONTENTS_DTYPES.get(field, np.int64))
    if dtype.kind in "iu" and dtype != array.dtype and array.size:
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            invalid(f"input {spec.name!r}: values must lie in {info.min}..{info.max} for "
                    f"{spec.datatype}")
    return array.astype(dtype).reshape(shape)


def _check_outputs(request: pb.ModelInferRequest, model: ServedModel) -> None:
    names = {t.name for t in model.config.outputs}
    wanted = [o.name for o in request.outputs]
    if any(name not in names for name in wanted) or len(set(wanted)) != len(wanted):
        invalid(f"model {model.name!r} has outputs {[t.name for t in model.config.outputs]}; "
                f"requested [{', '.join(shown(n, 64) for n in wanted[:16])}]")
    for output in request.outputs:
        if "classification" in output.parameters:
            invalid("the classification extension is not supported; use the "
                    "cnnserve.v1.Classifier API for labels and probabilities")


def _shape(spec: TensorSpec, batched: bool) -> list[int]:
    """A tensor's shape as the protocol's metadata shows it: -1 for the batch dimension."""
    return [-1, *spec.shape] if batched else list(spec.shape)


def _raw(array: np.ndarray, spec: TensorSpec) -> bytes:
    return np.ascontiguousarray(array, dtype=NUMPY_DTYPES[spec.datatype]).tobytes()


def _data_type(spec: TensorSpec) -> str:
    """Triton's configuration enum for a protocol datatype (BYTES is TYPE_STRING)."""
    return "TYPE_STRING" if spec.datatype == "BYTES" else f"TYPE_{spec.datatype}"


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, core: InferenceCore) -> None:
        self.core = core

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.core.models.all_ready)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ModelReadyResponse:
        model = self.core.models.current(request.name)
        ready = (model is not None and model.ready
                 and request.version in ("", str(model.version)))
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION,
                                         extensions=list(EXTENSIONS))

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        model = self.core.model(request.name, request.version)
        config, meta = model.config, pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name, versions=[str(model.version)], platform=PLATFORM,
            inputs=[meta(name=t.name, datatype=t.datatype, shape=_shape(t, config.batched))
                    for t in config.inputs],
            outputs=[meta(name=t.name, datatype=t.datatype, shape=_shape(t, config.batched))
                     for t in config.outputs])

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ModelInferResponse:
        result = await self.core.infer(InferRequest(
            api="oip", model=request.model_name, version=request.model_version,
            rows=_declared_rows(request), prepare=functools.partial(_inputs, request),
            timeout_s=context.time_remaining()))
        model = result.model
        wanted = {o.name for o in request.outputs}
        chosen = [(spec, array) for spec, array in zip(model.config.outputs, result.outputs,
                                                       strict=True)
                  if not wanted or spec.name in wanted]
        return pb.ModelInferResponse(
            model_name=model.name, model_version=str(model.version), id=request.id,
            outputs=[pb.ModelInferResponse.InferOutputTensor(
                name=spec.name, datatype=spec.datatype, shape=list(array.shape))
                for spec, array in chosen],
            raw_output_contents=[_raw(array, spec) for spec, array in chosen])

    async def ModelConfig(self, request: pb.ModelConfigRequest,
                          context: grpc.aio.ServicerContext) -> pb.ModelConfigResponse:
        """Triton's configuration of the model, as perf_analyzer and Model Analyzer read it:
        dims leave out the batch dimension, as in Triton's config.pbtxt."""
        model = self.core.model(request.name, request.version)
        config, policy = model.config, model.policy
        on_gpu = model.provider == "CUDAExecutionProvider"
        image = mc.ModelInput.FORMAT_NCHW if model.metadata else mc.ModelInput.FORMAT_NONE
        batching = mc.ModelDynamicBatching(
            preferred_batch_size=sorted(policy.preferred_batch_sizes),
            max_queue_delay_microseconds=round(policy.max_queue_delay_s * 1e6))
        return pb.ModelConfigResponse(config=mc.ModelConfig(
            name=model.name, platform=PLATFORM, backend="onnxruntime",
            version_policy=mc.ModelVersionPolicy(
                latest=mc.ModelVersionPolicy.Latest(num_versions=1)),
            max_batch_size=policy.max_batch_size,
            input=[mc.ModelInput(name=t.name, data_type=_data_type(t), format=image,
                                 dims=list(t.shape)) for t in config.inputs],
            output=[mc.ModelOutput(name=t.name, data_type=_data_type(t), dims=list(t.shape))
                    for t in config.outputs],
            dynamic_batching=batching if config.batched else None,
            instance_group=[mc.ModelInstanceGroup(
                name=f"{model.name}_0", count=policy.instances,
                kind=mc.ModelInstanceGroup.KIND_GPU if on_gpu else mc.ModelInstanceGroup.KIND_CPU,
                gpus=[0] if on_gpu else [])],
            default_model_filename=model.file or "model.onnx"))

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest,
                              context: grpc.aio.ServicerContext) -> pb.ModelStatisticsResponse:
        return pb.ModelStatisticsResponse(model_stats=[pb.ModelStatistics(
            name=m.name, version=str(m.version), last_inference=m.stats.last_inference_ms,
            inference_count=m.stats.inference_count, execution_count=m.stats.execution_count,
            inference_stats=pb.InferStatistics(
                success=_duration(m.stats.success), fail=_duration(m.stats.fail),
                queue=_duration(m.stats.queue),
                compute_input=_duration(m.stats.compute.input),
                compute_infer=_duration(m.stats.compute.infer),
                compute_output=_duration(m.stats.compute.output)),
            batch_stats=[pb.InferBatchStatistics(
                batch_size=size, compute_input=_duration(c.input),
                compute_infer=_duration(c.infer), compute_output=_duration(c.output))
                for size, c in sorted(m.stats.batches.items())])
            for m in self.core.statistics(request.name, request.version)])

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest,
                              context: grpc.aio.ServicerContext) -> pb.RepositoryIndexResponse:
        entries = [pb.RepositoryIndexResponse.ModelIndex(
            name=m.name, version=str(m.version), state="READY" if m.ready else "UNAVAILABLE",
            reason=m.reason) for m in self.core.models if m.ready or not request.ready]
        return pb.RepositoryIndexResponse(models=entries)
