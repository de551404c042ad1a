"""The Open Inference Protocol (KServe v2, with Triton's extensions) on the project's types.

Every binding (gRPC, REST) translates its wire format to these types and back, so both
share one reading of the protocol: the tensor checks, datatypes, shared-memory inputs and
outputs, output selection, and the metadata, configuration and statistics documents.
Inputs arrive raw, typed or in shared memory; outputs go back raw, as Triton answers
(tritonclient decodes outputs only from raw bytes), or into shared memory.

The documents (server and model metadata, configuration, statistics, repository index,
shared memory status) are Triton's JSON: REST answers them as they are, and gRPC parses
them into the protocol's messages, whose fields have the same names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np

from contract.repository import NUMPY_DTYPES, TensorSpec
from service import __version__
from service.core.admission import Call
from service.core.inference import InferenceCore, InferRequest, InferResult
from service.engine.models import InputLayout, ServedModel
from service.engine.reload import ModelControl
from service.engine.runtime import CUDA, Tensors
from service.memory.regions import Regions
from service.observability.metrics import Duration
from service.status import bounded, invalid, shown

SERVER_NAME = "cnnserve"
PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ("model_configuration", "model_repository", "statistics", "system_shared_memory")
"""Triton's protocol extensions this server implements whole (load and unload answer
FAILED_PRECONDITION unless --model-control-mode is explicit, as Triton's do), and
cuda_shared_memory on a host with a GPU."""
CONTENTS_FIELDS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
                   "INT32": "int_contents", "INT64": "int64_contents",
                   "UINT8": "uint_contents", "UINT16": "uint_contents",
                   "UINT32": "uint_contents", "UINT64": "uint64_contents",
                   "FP32": "fp32_contents", "FP64": "fp64_contents"}
"""Where the protocol's typed contents hold each datatype (FP16 travels raw only)."""
_CONTENTS_DTYPES: dict[str, type] = {
    "bool_contents": np.bool_, "int64_contents": np.int64, "uint64_contents": np.uint64,
    "fp32_contents": np.float32, "fp64_contents": np.float64}
"""The numpy type each field's values fit whole; the 32-bit fields are read as int64 and
range-checked against the narrower datatype."""
_PARAMETER_KINDS = {bool: "bool_param", str: "string_param", float: "double_param",
                    type(None): "None"}

Parameter = bool | int | float | str
"""A parameter's value, as both bindings carry them (None: a gRPC parameter holding none)."""
Parameters = Mapping[str, Parameter | None]


@dataclass(slots=True)
class InputTensor:
    name: str
    datatype: str
    shape: Sequence[int]
    parameters: Parameters = field(default_factory=dict)
    contents: Mapping[str, Sequence[Any]] | None = None
    """Typed values by the protocol's field names (`fp32_contents`, ...), when the client
    sent them typed; None when it sent none."""


@dataclass(slots=True)
class RequestedOutput:
    name: str
    parameters: Parameters = field(default_factory=dict)


@dataclass(slots=True)
class OipRequest:
    """A ModelInfer request: inputs, and the raw bytes of each input not in shared
    memory, in order (the protocol's raw_input_contents)."""

    model: str
    version: str = ""
    id: str = ""
    inputs: Sequence[InputTensor] = ()
    raw: Sequence[bytes | memoryview] = ()
    outputs: Sequence[RequestedOutput] = ()


@dataclass(slots=True)
class OutputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes
    """The little-endian bytes; empty when written into shared memory."""
    region: str | None = None
    """The shared memory region it was written into, and how many bytes."""
    written: int = 0


@dataclass(slots=True)
class OipResponse:
    model: str
    version: str
    id: str
    outputs: list[OutputTensor]


@dataclass(slots=True)
class TensorPayload:
    """The request's tensors as the core prepares them: checked against the model that
    will run it (again after a hot reload moves it to a new version)."""

    request: OipRequest
    shm: Regions
    offload = False

    @property
    def rows(self) -> int:
        """The batch dimension the request declares (its first input's first dim); 0 when
        there is none (then `tensors` says what is wrong)."""
        inputs = self.request.inputs
        shape = inputs[0].shape if inputs else ()
        return shape[0] if shape else 0

    def tensors(self, model: ServedModel, call: Call) -> Tensors:
        return checked_inputs(self.request, self.shm, model)


def checked_inputs(request: OipRequest, shm: Regions, model: ServedModel) -> Tensors:
    """The request checked against `model`: its inputs by name, in the model's order, or
    INVALID_ARGUMENT. Inputs that name a shared memory region are read from it in place;
    `raw` holds one entry for each of the others, in order."""
    layouts = model.inputs
    given = request.inputs
    raw = request.raw
    sent_raw = len(raw)
    tensors: Tensors = {}
    rows = 0
    next_raw = 0
    inputs = len(layouts)
    if len(given) != inputs:
        _wrong_names(model, given)
    for tensor in given:
        layout = layouts.get(tensor.name)
        if layout is None or tensor.name in tensors:
            _wrong_names(model, given)
        window = shm_window(tensor.parameters, f"input {shown(tensor.name)}") \
            if tensor.parameters else None
        shape = _checked_shape(tensor, layout)
        if layout.batched:
            if rows and shape[0] != rows:
                invalid("every input's first (batch) dimension must be the same, got "
                        f"{sorted({d for t in given for d in tuple(t.shape)[:1]})}")
            rows = shape[0]
        if (raw or window) and tensor.contents is not None:
            invalid(f"input {layout.spec.name!r}: send its data in one place (contents, "
                    "raw_input_contents or shared memory)")
        if window is not None:
            tensors[tensor.name] = shm.read(*window, layout.dtype, shape)
        elif raw:
            if next_raw == sent_raw:
                _wrong_raw_count(request)
            tensors[tensor.name] = _from_raw(raw[next_raw], layout, shape)
            next_raw += 1
        else:
            tensors[tensor.name] = _from_contents(tensor, layout.spec, shape)
    if next_raw != sent_raw:
        _wrong_raw_count(request)
    if request.outputs:
        _check_outputs(request, model, shm)
    if inputs > 1:
        return {name: tensors[name] for name in layouts}
    return tensors


def _wrong_names(model: ServedModel, given: Sequence[InputTensor]) -> NoReturn:
    invalid(f"model {model.name!r} takes inputs {list(model.inputs)}, got "
            f"[{', '.join(shown(t.name, 64) for t in given[:16])}]")


def _wrong_raw_count(request: OipRequest) -> NoReturn:
    sent = sum(not (t.parameters and "shared_memory_region" in t.parameters)
               for t in request.inputs)
    invalid(f"expected {sent} raw_input_contents entries (one per input not in shared "
            f"memory), got {len(request.raw)}")


def shm_window(parameters: Parameters, what: str
               ) -> tuple[str, int, int] | None:
    """(region, offset, byte_size) from Triton's shared memory parameters, if set."""
    if "shared_memory_region" not in parameters:
        return None
    region = parameters["shared_memory_region"]
    if not isinstance(region, str):
        region = ""
    size = parameters.get("shared_memory_byte_size")
    if size is None:
        invalid(f"{what} names shared memory region {shown(region)} without "
                "shared_memory_byte_size")
    offset = parameters.get("shared_memory_offset")
    return (region, _int_param(offset) if offset is not None else 0, _int_param(size))


def _int_param(value: Parameter | None) -> int:
    if type(value) is not int:
        invalid("shared memory sizes and offsets are integers, got "
                f"{_PARAMETER_KINDS.get(type(value), type(value).__name__)}")
    if value < 0:
        invalid(f"shared memory sizes and offsets are not negative, got {value}")
    return value


def _checked_shape(tensor: InputTensor, layout: InputLayout) -> tuple[int, ...]:
    spec = layout.spec
    if tensor.datatype != spec.datatype:
        invalid(f"input {spec.name!r} must have datatype {spec.datatype}, got "
                f"{shown(tensor.datatype, 16)}")
    shape = tuple(tensor.shape)
    expected = layout.shape
    if layout.tail is None:
        fits = len(shape) == len(expected) and all(
            d >= 1 and (e == -1 or d == e) for d, e in zip(shape, expected, strict=True))
    elif layout.batched:  # no dim of any size: one comparison, and the batch's
        fits = shape[1:] == layout.tail and shape != () and shape[0] >= 1
    else:
        fits = shape == expected
    if not fits:
        wanted = ", ".join("N" if (layout.batched and i == 0) else ("*" if e == -1 else str(e))
                           for i, e in enumerate(expected))
        invalid(f"input {spec.name!r} must have shape [{wanted}] (each dim >= 1), got "
                f"{list(shape[:16])}")
    return shape


def _from_raw(raw: bytes | memoryview, layout: InputLayout, shape: tuple[int, ...]
              ) -> np.ndarray:
    spec = layout.spec
    if layout.tail is not None:
        needed = shape[0] * layout.row_bytes if layout.batched else layout.row_bytes
    else:
        needed = math.prod(shape) * layout.dtype.itemsize
    if len(raw) != needed:
        invalid(f"input {spec.name!r} of shape {list(shape)} needs {needed} bytes of "
                f"little-endian {spec.datatype}, got {len(raw)}")
    array = np.frombuffer(raw, dtype=layout.dtype).reshape(shape)
    if spec.datatype == "BOOL" and array.view(np.uint8).max(initial=0) > 1:
        invalid(f"input {spec.name!r} is BOOL: each byte must be 0 or 1")
    return array


def _from_contents(tensor: InputTensor, spec: TensorSpec, shape: tuple[int, ...]
                   ) -> np.ndarray:
    field_name = CONTENTS_FIELDS.get(spec.datatype)
    if tensor.contents is None:
        invalid(f"input {spec.name!r} carries no data: fill raw_input_contents"
                + (f" or contents.{field_name}" if field_name else ""))
    if field_name is None:
        invalid(f"{spec.datatype} input {spec.name!r} travels in raw_input_contents only")
    others = [name for name in tensor.contents if name != field_name]
    if others:
        invalid(f"{spec.datatype} input data goes in contents.{field_name}, got {others}")
    values = tensor.contents.get(field_name, ())
    count = math.prod(shape)
    if len(values) != count:
        invalid(f"input {spec.name!r} of shape {list(shape)} needs {count} {field_name} "
                f"values, got {len(values)}")
    dtype = np.dtype(NUMPY_DTYPES[spec.datatype])
    array: np.ndarray = np.asarray(values, dtype=_CONTENTS_DTYPES.get(field_name, np.int64))
    if dtype.kind in "iu" and dtype != array.dtype and array.size:
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            invalid(f"input {spec.name!r}: values must lie in {info.min}..{info.max} for "
                    f"{spec.datatype}")
    return array.astype(dtype).reshape(shape)


def _check_outputs(request: OipRequest, model: ServedModel, shm: Regions) -> None:
    """The outputs a request names exist, once each; shared memory regions it names are
    registered (NOT_FOUND before the model runs, not after)."""
    names = model.output_names
    seen: set[str] = set()
    for output in request.outputs:
        if output.name not in names or output.name in seen:
            wanted = [o.name for o in request.outputs]
            invalid(f"model {model.name!r} has outputs {list(names)}; "
                    f"requested [{', '.join(shown(n, 64) for n in wanted[:16])}]")
        seen.add(output.name)
        if not output.parameters:
            continue
        if "classification" in output.parameters:
            invalid("the classification extension is not supported; use the "
                    "cnnserve.v1.Classifier API for labels and probabilities")
        window = shm_window(output.parameters, f"output {shown(output.name)}")
        if window is not None:
            shm.check(window[0])


def _raw(array: np.ndarray, spec: TensorSpec) -> bytes:
    """An output's little-endian bytes (onnxruntime's are already, in row-major order)."""
    return np.ascontiguousarray(array, dtype=NUMPY_DTYPES[spec.datatype]).tobytes()


def _shape(spec: TensorSpec, batched: bool) -> list[int]:
    """A tensor's shape as the protocol's metadata shows it: -1 for the batch dimension."""
    return [-1, *spec.shape] if batched else list(spec.shape)


def _data_type(spec: TensorSpec) -> str:
    """Triton's configuration enum for a protocol datatype (BYTES is TYPE_STRING)."""
    return "TYPE_STRING" if spec.datatype == "BYTES" else f"TYPE_{spec.datatype}"


def _duration(d: Duration) -> dict[str, int]:
    return {"count": d.count, "ns": d.ns}


class OpenInference:
    """The Open Inference Protocol's calls, for every binding (gRPC, REST)."""

    def __init__(self, core: InferenceCore, shm: Regions, control: ModelControl) -> None:
        self.core = core
        self.shm = shm
        self.control = control
        self.extensions = [*EXTENSIONS,
                           *(["cuda_shared_memory"] if shm.cuda.available() else [])]

    def server_ready(self) -> bool:
        return self.core.ready

    def model_ready(self, name: str, version: str = "") -> bool:
        model = self.core.models.current(name)
        return model is not None and model.ready and version in ("", str(model.version))

    def require(self, name: str, version: str = "", call: Call | None = None) -> None:
        """NOT_FOUND for a model or version that is not served, UNAVAILABLE for one not
        ready: what a binding checks before it reads a request's body."""
        self.core.model(name, version, call)

    def require_known(self, name: str, version: str = "") -> None:
        """NOT_FOUND for a model or version that is not served, ready or not."""
        self.core.find(name, version)

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": __version__, "extensions": self.extensions}

    def model_metadata(self, name: str, version: str, call: Call | None = None
                       ) -> dict[str, Any]:
        model = self.core.model(name, version, call)
        batched = model.config.batched
        return {"name": model.name, "versions": [str(model.version)], "platform": PLATFORM,
                "inputs": [{"name": t.name, "datatype": t.datatype,
                            "shape": _shape(t, batched)} for t in model.config.inputs],
                "outputs": [{"name": t.name, "datatype": t.datatype,
                             "shape": _shape(t, batched)} for t in model.config.outputs]}

    async def infer(self, request: OipRequest, api: str, timeout_s: float | None,
                    call: Call | None = None) -> OipResponse:
        """One inference: the request checked against the model that runs it, batched
        with others; inputs and outputs in shared memory where it names regions."""
        result = await self.core.infer(InferRequest(api, request.model, request.version,
                                                    TensorPayload(request, self.shm),
                                                    timeout_s, call))
        return self.respond(request, result)

    def respond(self, request: OipRequest, result: InferResult) -> OipResponse:
        """The outputs the request asked for (all, if it named none), raw or written
        into the shared memory regions it named."""
        model = result.model
        outputs: list[OutputTensor] = []
        if not request.outputs:
            for spec, array in zip(model.config.outputs, result.outputs, strict=True):
                outputs.append(OutputTensor(spec.name, spec.datatype, array.shape,
                                            _raw(array, spec)))
            return OipResponse(model.name, str(model.version), request.id, outputs)
        wanted = {o.name: o.parameters for o in request.outputs}
        for spec, array in zip(model.config.outputs, result.outputs, strict=True):
            if spec.name not in wanted:
                continue
            parameters = wanted[spec.name]
            window = shm_window(parameters, f"output {shown(spec.name)}") if parameters \
                else None
            if window is None:
                outputs.append(OutputTensor(spec.name, spec.datatype, array.shape,
                                            _raw(array, spec)))
                continue
            written = self.shm.write(*window, array.astype(NUMPY_DTYPES[spec.datatype],
                                                           copy=False))
            outputs.append(OutputTensor(spec.name, spec.datatype, array.shape, b"",
                                        window[0], written))
        return OipResponse(model.name, str(model.version), request.id, outputs)

    def model_config(self, name: str, version: str, call: Call | None = None
                     ) -> dict[str, Any]:
        """Triton's configuration of the model, as perf_analyzer and Model Analyzer read it:
        dims leave out the batch dimension, as in Triton's config.pbtxt."""
        model = self.core.model(name, version, call)
        config, policy = model.config, model.policy
        on_gpu = model.provider == CUDA
        image = "FORMAT_NCHW" if model.metadata else "FORMAT_NONE"
        doc: dict[str, Any] = {
            "name": model.name, "platform": PLATFORM,
            "version_policy": {"latest": {"num_versions": 1}},
            "max_batch_size": policy.max_batch_size,
            "input": [{"name": t.name, "data_type": _data_type(t), "format": image,
                       "dims": list(t.shape)} for t in config.inputs],
            "output": [{"name": t.name, "data_type": _data_type(t), "dims": list(t.shape)}
                       for t in config.outputs],
            "instance_group": [{"name": f"{model.name}_0", "count": policy.instances,
                                "kind": "KIND_GPU" if on_gpu else "KIND_CPU",
                                "gpus": [model.device_id] if model.device_id is not None
                                else []}],
            "default_model_filename": model.file or "model.onnx",
            "parameters": {"execution_provider": {"string_value": model.provider},
                           "model_file": {"string_value": model.file}}}
        if config.batched:
            doc["dynamic_batching"] = {
                "preferred_batch_size": sorted(policy.preferred_batch_sizes),
                "max_queue_delay_microseconds": round(policy.max_queue_delay_s * 1e6),
                "preserve_ordering": False}
        doc["backend"] = "onnxruntime"
        return doc

    def model_statistics(self, name: str, version: str, call: Call | None = None
                         ) -> dict[str, Any]:
        return {"model_stats": [{
            "name": m.name, "version": str(m.version),
            "last_inference": m.stats.last_inference_ms,
            "inference_count": m.stats.inference_count,
            "execution_count": m.stats.execution_count,
            "inference_stats": {
                "success": _duration(m.stats.success), "fail": _duration(m.stats.fail),
                "queue": _duration(m.stats.queue),
                "compute_input": _duration(m.stats.compute.input),
                "compute_infer": _duration(m.stats.compute.infer),
                "compute_output": _duration(m.stats.compute.output)},
            "batch_stats": [{"batch_size": size, "compute_input": _duration(c.input),
                             "compute_infer": _duration(c.infer),
                             "compute_output": _duration(c.output)}
                            for size, c in sorted(m.stats.batches.items())]}
            for m in self.core.statistics(name, version, call)]}

    async def repository_index(self, ready_only: bool) -> list[dict[str, Any]]:
        return [{"name": v.name, "version": str(v.version) if v.version else "",
                 "state": v.state, "reason": bounded(v.reason)}
                for v in await self.control.index() if v.state == "READY" or not ready_only]

    async def load(self, name: str, parameters: Sequence[str]) -> None:
        """`parameters`: the names of the load parameters the client sent."""
        if parameters:
            invalid(f"load parameters are not supported (got {sorted(parameters)[:8]}): "
                    "edit the repository, then load")
        await self.control.load(name)

    async def unload(self, name: str) -> None:
        await self.control.unload(name)

    def register_system(self, name: str, key: str, offset: int, byte_size: int) -> None:
        self.shm.register_system(name, key, offset, byte_size)

    def system_status(self, name: str) -> list[dict[str, Any]]:
        return [{"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size}
                for r in self.shm.system.status(name)]

    def unregister_system(self, name: str) -> None:
        self.shm.system.unregister(name)

    def register_cuda(self, name: str, raw_handle: bytes, device_id: int, byte_size: int
                      ) -> None:
        self.shm.register_cuda(name, raw_handle, device_id, byte_size)

    def cuda_status(self, name: str) -> list[dict[str, Any]]:
        return [{"name": r.name, "device_id": r.device_id, "byte_size": r.byte_size}
                for r in self.shm.cuda.status(name)]

    def unregister_cuda(self, name: str) -> None:
        self.shm.cuda.unregister(name)
