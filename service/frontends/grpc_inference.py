"""Open Inference Protocol (KServe v2 / Triton) gRPC servicer.

Inputs arrive as `raw_input_contents` (what tritonclient sends) or typed
`contents.fp32_contents`; outputs always go back raw, as Triton answers, because
tritonclient decodes outputs only from `raw_output_contents`.
"""

from __future__ import annotations

import functools

import grpc
import numpy as np

from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from protos import model_config_pb2 as mc
from service.admission import Call
from service.core import InferenceCore, InferRequest, invalid
from service.engine.models import ServedModel
from service.metrics import Duration

_DATA_TYPES = {"FP32": mc.TYPE_FP32, "FP16": mc.TYPE_FP16}
"""The Open Inference Protocol's datatype names as Triton's configuration enumerates them."""
SERVER_NAME = "cnnserve"
SERVER_VERSION = "0.1.0"
PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ("model_configuration", "statistics")
"""Triton's protocol extensions this server implements whole (RepositoryIndex is served,
but model_repository also means load and unload, which it does not have yet)."""


def _declared_rows(request: pb.ModelInferRequest) -> int:
    """The batch dimension the request declares; 0 when its inputs are malformed (then
    `_inputs` says how)."""
    shape = request.inputs[0].shape if len(request.inputs) == 1 else ()
    return shape[0] if shape else 0


def _inputs(request: pb.ModelInferRequest, model: ServedModel, call: Call) -> np.ndarray:
    """The request checked against `model`: its input batch, or INVALID_ARGUMENT."""
    inputs = _input(request, model)
    _check_outputs(request, model)
    return inputs


def _input(request: pb.ModelInferRequest, model: ServedModel) -> np.ndarray:
    """The request's single FP32 input as an (n, C, H, W) array, or INVALID_ARGUMENT."""
    spec = model.config.input
    if len(request.inputs) != 1 or request.inputs[0].name != spec.name:
        invalid(f"model {model.name!r} takes exactly one input named {spec.name!r}, got "
                f"{[i.name for i in request.inputs]}")
    tensor = request.inputs[0]
    if tensor.datatype != spec.datatype:
        invalid(f"input {spec.name!r} must have datatype {spec.datatype}, got "
                f"{tensor.datatype!r}")
    shape = tuple(tensor.shape)
    if len(shape) != 1 + len(spec.shape) or shape[1:] != spec.shape or shape[0] < 1:
        invalid(f"input {spec.name!r} must have shape [N, {', '.join(map(str, spec.shape))}] "
                f"with N >= 1, got {list(shape)}")
    count = int(np.prod(shape))
    typed = tensor.HasField("contents")
    if request.raw_input_contents:
        if typed:
            invalid("send input data either in raw_input_contents or in contents, not both")
        if len(request.raw_input_contents) != 1:
            invalid(f"expected 1 raw_input_contents entry (one per input), got "
                    f"{len(request.raw_input_contents)}")
        raw = request.raw_input_contents[0]
        if len(raw) != count * 4:
            invalid(f"input {spec.name!r} of shape {list(shape)} needs {count * 4} bytes of "
                    f"little-endian FP32, got {len(raw)}")
        return np.frombuffer(raw, dtype="<f4").reshape(shape)
    if not typed:
        invalid(f"input {spec.name!r} carries no data: fill raw_input_contents or "
                "contents.fp32_contents")
    values = tensor.contents.fp32_contents
    others = [f.name for f, _ in tensor.contents.ListFields() if f.name != "fp32_contents"]
    if others:
        invalid(f"FP32 input data goes in contents.fp32_contents, got {others}")
    if len(values) != count:
        invalid(f"input {spec.name!r} of shape {list(shape)} needs {count} fp32_contents "
                f"values, got {len(values)}")
    return np.asarray(values, dtype=np.float32).reshape(shape)


def _check_outputs(request: pb.ModelInferRequest, model: ServedModel) -> None:
    wanted = [o.name for o in request.outputs]
    if any(name != model.config.output.name for name in wanted):
        invalid(f"model {model.name!r} has one output, {model.config.output.name!r}; "
                f"requested {wanted}")
    for output in request.outputs:
        if "classification" in output.parameters:
            invalid("the classification extension is not supported; use the "
                    "cnnserve.v1.Classifier API for labels and probabilities")


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
        spec_in, spec_out = model.config.input, model.config.output
        return pb.ModelMetadataResponse(
            name=model.name, versions=[str(model.version)], platform=PLATFORM,
            inputs=[pb.ModelMetadataResponse.TensorMetadata(
                name=spec_in.name, datatype=spec_in.datatype, shape=[-1, *spec_in.shape])],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(
                name=spec_out.name, datatype=spec_out.datatype, shape=[-1, *spec_out.shape])])

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ModelInferResponse:
        result = await self.core.infer(InferRequest(
            api="oip", model=request.model_name, version=request.model_version,
            rows=_declared_rows(request), prepare=functools.partial(_inputs, request),
            timeout_s=context.time_remaining()))
        model, logits = result.model, result.outputs
        return pb.ModelInferResponse(
            model_name=model.name, model_version=str(model.version), id=request.id,
            outputs=[pb.ModelInferResponse.InferOutputTensor(
                name=model.config.output.name, datatype="FP32", shape=list(logits.shape))],
            raw_output_contents=[np.ascontiguousarray(logits, dtype="<f4").tobytes()])

    async def ModelConfig(self, request: pb.ModelConfigRequest,
                          context: grpc.aio.ServicerContext) -> pb.ModelConfigResponse:
        """Triton's configuration of the model, as perf_analyzer and Model Analyzer read it:
        dims leave out the batch dimension, as in Triton's config.pbtxt."""
        model = self.core.model(request.name, request.version)
        spec_in, spec_out, policy = model.config.input, model.config.output, model.policy
        on_gpu = model.provider == "CUDAExecutionProvider"
        return pb.ModelConfigResponse(config=mc.ModelConfig(
            name=model.name, platform=PLATFORM, backend="onnxruntime",
            version_policy=mc.ModelVersionPolicy(
                latest=mc.ModelVersionPolicy.Latest(num_versions=1)),
            max_batch_size=policy.max_batch_size,
            input=[mc.ModelInput(name=spec_in.name, data_type=_DATA_TYPES[spec_in.datatype],
                                 format=mc.ModelInput.FORMAT_NCHW, dims=list(spec_in.shape))],
            output=[mc.ModelOutput(name=spec_out.name,
                                   data_type=_DATA_TYPES[spec_out.datatype],
                                   dims=list(spec_out.shape))],
            dynamic_batching=mc.ModelDynamicBatching(
                preferred_batch_size=sorted(policy.preferred_batch_sizes),
                max_queue_delay_microseconds=round(policy.max_queue_delay_s * 1e6)),
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
