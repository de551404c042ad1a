"""The Open Inference Protocol (KServe v2, with Triton's extensions) on its own messages.

Every binding translates to and from these messages (`grpc_service.proto`'s), so gRPC and
REST share one reading of the protocol: inputs arrive raw, typed or in shared memory;
outputs go back raw, as Triton answers (tritonclient decodes outputs only from
`raw_output_contents`), or into shared memory.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import numpy as np

from contract.repository import NUMPY_DTYPES, TensorSpec
from protos import grpc_service_pb2 as pb
from protos import model_config_pb2 as mc
from service.core.admission import Call
from service.core.inference import InferenceCore, InferRequest, invalid
from service.engine.models import ServedModel
from service.engine.reload import ModelControl
from service.engine.runtime import Tensors, cuda_available
from service.memory.system import Regions
from service.observability.metrics import Duration
from service.status import bounded, shown

SERVER_NAME = "cnnserve"
SERVER_VERSION = "0.1.0"
PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ("model_configuration", "model_repository", "statistics", "system_shared_memory")
"""Triton's protocol extensions this server implements whole (load and unload answer
FAILED_PRECONDITION unless --model-control-mode is explicit, as Triton's do), and
cuda_shared_memory on a host with a GPU."""
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


def _inputs(request: pb.ModelInferRequest, shm: Regions, model: ServedModel,
            call: Call) -> Tensors:
    """The request checked against `model`: its inputs by name, or INVALID_ARGUMENT.
    Inputs that name a shared memory region are read from it in place; raw_input_contents
    holds one entry for each of the others, in order."""
    config = model.config
    given = [t.name for t in request.inputs]
    names = [t.name for t in config.inputs]
    if given != names and sorted(given) != sorted(names):
        invalid(f"model {model.name!r} takes inputs {[t.name for t in config.inputs]}, got "
                f"[{', '.join(shown(n, 64) for n in given[:16])}]")
    in_shm = [_shm_window(t.parameters, f"input {shown(t.name)}") for t in request.inputs]
    raw = request.raw_input_contents
    sent = sum(window is None for window in in_shm)
    if raw and len(raw) != sent:
        invalid(f"expected {sent} raw_input_contents entries (one per input not in shared "
                f"memory), got {len(raw)}")
    specs = {t.name: t for t in config.inputs}
    tensors: Tensors = {}
    rows: set[int] = set()
    next_raw = 0
    for tensor, window in zip(request.inputs, in_shm, strict=True):
        spec = specs[tensor.name]
        shape = _checked_shape(tensor, spec, config.batched)
        if config.batched:
            rows.add(shape[0])
        if (raw or window) and tensor.HasField("contents"):
            invalid(f"input {spec.name!r}: send its data in one place (contents, "
                    "raw_input_contents or shared memory)")
        if window is not None:
            tensors[spec.name] = shm.read(*window, np.dtype(NUMPY_DTYPES[spec.datatype]), shape)
        elif raw:
            tensors[spec.name] = _from_raw(raw[next_raw], spec, shape)
            next_raw += 1
        else:
            tensors[spec.name] = _from_contents(tensor, spec, shape)
    if len(rows) > 1:
        invalid(f"every input's first (batch) dimension must be the same, got {sorted(rows)}")
    _check_outputs(request, model, shm)
    return {t.name: tensors[t.name] for t in config.inputs}


def _shm_window(parameters: Mapping[str, pb.InferParameter], what: str
                ) -> tuple[str, int, int] | None:
    """(region, offset, byte_size) from Triton's shared memory parameters, if set."""
    if "shared_memory_region" not in parameters:
        return None
    region = parameters["shared_memory_region"].string_param
    size = parameters.get("shared_memory_byte_size")
    if size is None:
        invalid(f"{what} names shared memory region {shown(region)} without "
                "shared_memory_byte_size")
    offset = parameters.get("shared_memory_offset")
    return (region, _int_param(offset) if offset is not None else 0, _int_param(size))


def _int_param(parameter: pb.InferParameter) -> int:
    kind = parameter.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        invalid(f"shared memory sizes and offsets are integers, got {kind}")
    value = int(getattr(parameter, kind))
    if value < 0:
        invalid(f"shared memory sizes and offsets are not negative, got {value}")
    return value


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


def _check_outputs(request: pb.ModelInferRequest, model: ServedModel, shm: Regions) -> None:
    if not request.outputs:
        return  # every output
    names = {t.name for t in model.config.outputs}
    wanted = [o.name for o in request.outputs]
    if any(name not in names for name in wanted) or len(set(wanted)) != len(wanted):
        invalid(f"model {model.name!r} has outputs {[t.name for t in model.config.outputs]}; "
                f"requested [{', '.join(shown(n, 64) for n in wanted[:16])}]")
    for output in request.outputs:
        if "classification" in output.parameters:
            invalid("the classification extension is not supported; use the "
                    "cnnserve.v1.Classifier API for labels and probabilities")
        window = _shm_window(output.parameters, f"output {shown(output.name)}")
        if window is not None:
            shm.check(window[0])  # NOT_FOUND before the model runs, not after


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


class OpenInference:
    """The Open Inference Protocol's calls on its messages, for every binding (gRPC, REST)."""

    def __init__(self, core: InferenceCore, shm: Regions, control: ModelControl) -> None:
        self.core = core
        self.shm = shm
        self.control = control
        self.extensions = [*EXTENSIONS, *(["cuda_shared_memory"] if cuda_available() else [])]
        self.draining = False
        """Set at shutdown: the server answers not ready while it finishes what it holds."""

    async def ServerLive(self, request: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.core.models.all_ready and not self.draining)

    async def ModelReady(self, request: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
        model = self.core.models.current(request.name)
        ready = (model is not None and model.ready
                 and request.version in ("", str(model.version)))
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION,
                                         extensions=self.extensions)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
        model = self.core.model(request.name, request.version)
        config, meta = model.config, pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name, versions=[str(model.version)], platform=PLATFORM,
            inputs=[meta(name=t.name, datatype=t.datatype, shape=_shape(t, config.batched))
                    for t in config.inputs],
            outputs=[meta(name=t.name, datatype=t.datatype, shape=_shape(t, config.batched))
                     for t in config.outputs])

    async def infer(self, request: pb.ModelInferRequest, api: str, timeout_s: float | None
                    ) -> pb.ModelInferResponse:
        """One inference: the request checked against the model that runs it, batched
        with others; inputs and outputs in shared memory where it names regions."""
        result = await self.core.infer(InferRequest(
            api=api, model=request.model_name, version=request.model_version,
            rows=_declared_rows(request), prepare=functools.partial(_inputs, request, self.shm),
            timeout_s=timeout_s))
        model = result.model
        wanted = {o.name: o for o in request.outputs}
        response = pb.ModelInferResponse(model_name=model.name,
                                         model_version=str(model.version), id=request.id)
        raw: list[bytes] = []
        for spec, array in zip(model.config.outputs, result.outputs, strict=True):
            if wanted and spec.name not in wanted:
                continue
            tensor = response.outputs.add(name=spec.name, datatype=spec.datatype,
                                          shape=array.shape)
            window = (_shm_window(wanted[spec.name].parameters, f"output {shown(spec.name)}")
                      if spec.name in wanted else None)
            if window is None:
                raw.append(_raw(array, spec))
                continue
            written = self.shm.write(*window, array.astype(NUMPY_DTYPES[spec.datatype],
                                                           copy=False))
            tensor.parameters["shared_memory_region"].string_param = window[0]
            tensor.parameters["shared_memory_byte_size"].int64_param = written
            raw.append(b"")  # one entry per output, as Triton's clients index them
        response.raw_output_contents.extend(raw)
        return response

    async def ModelConfig(self, request: pb.ModelConfigRequest) -> pb.ModelConfigResponse:
        """Triton's configuration of the model, as perf_analyzer and Model Analyzer read it:
        dims leave out the batch dimension, as in Triton's config.pbtxt."""
        model = self.core.model(request.name, request.version)
        config, policy = model.config, model.policy
        on_gpu = model.provider == "CUDAExecutionProvider"
        image = mc.ModelInput.FORMAT_NCHW if model.metadata else mc.ModelInput.FORMAT_NONE
        batching = mc.ModelDynamicBatching(
            preferred_batch_size=sorted(policy.preferred_batch_sizes),
            max_queue_delay_microseconds=0 if policy.work_conserving
            else round(policy.max_queue_delay_s * 1e6))
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

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest
                              ) -> pb.ModelStatisticsResponse:
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

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest
                              ) -> pb.RepositoryIndexResponse:
        entries = [pb.RepositoryIndexResponse.ModelIndex(
            name=v.name, version=str(v.version) if v.version else "", state=v.state,
            reason=bounded(v.reason)) for v in await self.control.index()
            if v.state == "READY" or not request.ready]
        return pb.RepositoryIndexResponse(models=entries)

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest
                                  ) -> pb.RepositoryModelLoadResponse:
        if request.parameters:
            invalid(f"load parameters are not supported (got {sorted(request.parameters)[:8]}): "
                    "edit the repository, then load")
        await self.control.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest
                                    ) -> pb.RepositoryModelUnloadResponse:
        await self.control.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    async def SystemSharedMemoryRegister(self, request: pb.SystemSharedMemoryRegisterRequest
                                         ) -> pb.SystemSharedMemoryRegisterResponse:
        self.shm.register_system(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryStatus(self, request: pb.SystemSharedMemoryStatusRequest
                                       ) -> pb.SystemSharedMemoryStatusResponse:
        status = pb.SystemSharedMemoryStatusResponse.RegionStatus
        return pb.SystemSharedMemoryStatusResponse(regions={
            r.name: status(name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size)
            for r in self.shm.system.status(request.name)})

    async def SystemSharedMemoryUnregister(self, request: pb.SystemSharedMemoryUnregisterRequest
                                           ) -> pb.SystemSharedMemoryUnregisterResponse:
        self.shm.system.unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryRegister(self, request: pb.CudaSharedMemoryRegisterRequest
                                       ) -> pb.CudaSharedMemoryRegisterResponse:
        self.shm.register_cuda(request.name, request.raw_handle, request.device_id,
                               request.byte_size)
        return pb.CudaSharedMemoryRegisterResponse()

    async def CudaSharedMemoryStatus(self, request: pb.CudaSharedMemoryStatusRequest
                                     ) -> pb.CudaSharedMemoryStatusResponse:
        status = pb.CudaSharedMemoryStatusResponse.RegionStatus
        return pb.CudaSharedMemoryStatusResponse(regions={
            r.name: status(name=r.name, device_id=r.device_id, byte_size=r.byte_size)
            for r in self.shm.cuda.status(request.name)})

    async def CudaSharedMemoryUnregister(self, request: pb.CudaSharedMemoryUnregisterRequest
                                         ) -> pb.CudaSharedMemoryUnregisterResponse:
        self.shm.cuda.unregister(request.name)
        return pb.CudaSharedMemoryUnregisterResponse()
