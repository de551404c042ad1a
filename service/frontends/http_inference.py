"""The Open Inference Protocol's REST binding (KServe v2, with Triton's binary tensor
extension), on the HTTP port.

Each route translates JSON, and binary tensors after an `Inference-Header-Content-Length`
JSON header, into the protocol's messages, hands them to `OpenInference` (the gRPC
binding's reading of the protocol too), and renders the answer back. Tensors given as
JSON `data` become raw bytes at once, so one check covers every way a tensor arrives.
"""

from __future__ import annotations

import asyncio
import binascii
import math
from base64 import b64decode
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import numpy as np
import orjson
from aiohttp import web
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from contract.repository import NUMPY_DTYPES
from protos import classifier_pb2 as cpb
from protos import grpc_service_pb2 as pb
from service.core.admission import CURRENT_CALL
from service.frontends.grpc_classifier import ClassifierServicer
from service.frontends.oip import OpenInference
from service.status import invalid, shown

HEADER_LENGTH = "Inference-Header-Content-Length"
_INT64 = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
          FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}
JSON = "application/json"
_SHM_PARAMETERS = {"shared_memory_region": "string_param",
                   "shared_memory_byte_size": "int64_param",
                   "shared_memory_offset": "int64_param"}
INLINE_PARSE_BYTES = 1 << 16
JSON_EXPANSION = 16
T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(doc: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(doc), status=status, content_type=JSON)


def proto_json(message: Message) -> dict[str, Any]:
    """A message as Triton's HTTP API shows it: proto field names, enums by name, and
    64-bit integers as numbers (protobuf's JSON mapping would make them strings)."""
    return _numbers(MessageToDict(message, preserving_proto_field_name=True,
                                  always_print_fields_with_no_presence=True),
                    message.DESCRIPTOR)


def _numbers(doc: dict[str, Any], descriptor: Descriptor) -> dict[str, Any]:
    for field in descriptor.fields:
        if field.name not in doc:
            continue
        value = doc[field.name]
        kind = field.message_type
        if kind is not None and kind.GetOptions().map_entry:
            inner = kind.fields_by_name["value"]
            doc[field.name] = {k: _convert(v, inner) for k, v in value.items()}
        elif field.label == FieldDescriptor.LABEL_REPEATED:
            doc[field.name] = [_convert(v, field) for v in value]
        else:
            doc[field.name] = _convert(value, field)
    return doc


def _convert(value: Any, field: FieldDescriptor) -> Any:
    if field.message_type is not None:
        return _numbers(value, field.message_type)
    return int(value) if field.type in _INT64 else value


def _count(value: object) -> bool:
    """A non-negative 64-bit integer (JSON's true and false are not)."""
    return type(value) is int and 0 <= value < 2**63


def _object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        invalid(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _parameters_into(parameters: Any, target: Any, what: str) -> dict[str, Any]:
    """Copy Triton's shared memory parameters into a message's `parameters`; returns all."""
    given = _object(parameters if parameters is not None else {}, f"{what} parameters")
    for key, kind in _SHM_PARAMETERS.items():
        if key in given:
            value = given[key]
            if kind == "int64_param" and not _count(value):
                invalid(f"{what}: {key} must be a non-negative 64-bit integer")
            if kind == "string_param" and not isinstance(value, str):
                invalid(f"{what}: {key} must be a string")
            setattr(target[key], kind, value)
    return given


def parse_infer(body: bytes, header_length: str | None, model: str, version: str
                ) -> tuple[pb.ModelInferRequest, set[str] | None]:
    """The request as the protocol's message, and the outputs to answer in binary (None:
    all of them)."""
    split = len(body)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            invalid(f"{HEADER_LENGTH} must be the JSON header's length, at most the body's "
                    f"{len(body)} bytes, got {shown(header_length, 20)}")
        split = int(header_length)
    doc = _object(_loads(body[:split]), "the request")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        invalid("the request needs a non-empty 'inputs' list")
    request = pb.ModelInferRequest(model_name=model, model_version=version,
                                   id=str(doc.get("id", ""))[:256])
    binary, offset = memoryview(body)[split:], 0
    for i, given in enumerate(inputs[:64]):
        item = _object(given, f"input {i}")
        name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str) or not (
                isinstance(shape, list) and len(shape) <= 16
                and all(_count(d) for d in shape)):
            invalid(f"input {i} needs 'name' (string), 'datatype' (string) and 'shape' "
                    "(at most 16 non-negative 64-bit integers)")
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        parameters = _parameters_into(item.get("parameters"), tensor.parameters,
                                      f"input {shown(name, 64)}")
        if "binary_data_size" in parameters:
            size = parameters["binary_data_size"]
            if not _count(size) or offset + size > len(binary):
                invalid(f"input {shown(name, 64)}: binary_data_size {shown(str(size), 20)} "
                        f"runs past the {len(binary)} bytes after the JSON header")
            request.raw_input_contents.append(bytes(binary[offset:offset + size]))
            offset += size
        elif "data" in item:
            request.raw_input_contents.append(_json_tensor(item["data"], name, datatype, shape))
        elif "shared_memory_region" not in parameters:
            invalid(f"input {shown(name, 64)} carries no data: give 'data', binary data or "
                    "a shared memory region")
    if offset != len(binary):
        invalid(f"{len(binary) - offset} bytes of binary data belong to no input")
    everything = _object(doc.get("parameters") or {}, "the request's parameters").get(
        "binary_data_output") is True
    binary_outputs: set[str] = set()
    outputs = doc.get("outputs") or []
    if not isinstance(outputs, list):
        invalid("'outputs' must be a list")
    for i, given in enumerate(outputs[:64]):
        item = _object(given, f"output {i}")
        name = item.get("name")
        if not isinstance(name, str):
            invalid(f"output {i} needs a 'name'")
        output = request.outputs.add(name=name)
        parameters = _parameters_into(item.get("parameters"), output.parameters,
                                      f"output {shown(name, 64)}")
        if parameters.get("binary_data") is True:
            binary_outputs.add(name)
    return request, None if everything else binary_outputs


def _json_tensor(data: object, name: str, datatype: str, shape: list[int]) -> bytes:
    """JSON values (flat or nested, row-major) as the tensor's raw bytes."""
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is None:
        invalid(f"input {shown(name, 64)}: datatype {shown(datatype, 16)} cannot travel as "
                "JSON data here")
    if not isinstance(data, list):
        invalid(f"input {shown(name, 64)}: 'data' must be a list")
    try:
        array = np.asarray(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        invalid(f"input {shown(name, 64)}: 'data' is not {datatype} values ({exc})")
    if array.size != math.prod(shape):
        invalid(f"input {shown(name, 64)} of shape {shape[:16]} needs {math.prod(shape)} "
                f"values, got {array.size}")
    return array.tobytes()


def render_infer(response: pb.ModelInferResponse, binary: set[str] | None) -> web.Response:
    """JSON outputs, or a JSON header followed by binary outputs (Triton's extension)."""
    outputs, blobs = [], []
    for output, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        entry: dict[str, Any] = {"name": output.name, "datatype": output.datatype,
                                 "shape": list(output.shape)}
        if "shared_memory_region" in output.parameters:
            entry["parameters"] = {k: getattr(v, str(v.WhichOneof("parameter_choice")))
                                   for k, v in output.parameters.items()}
        elif binary is None or output.name in binary:
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = np.frombuffer(raw, NUMPY_DTYPES[output.datatype]).tolist()
        outputs.append(entry)
    # "id" is always present, empty when the request named none: KServe's SDK requires it.
    doc: dict[str, Any] = {"id": response.id, "model_name": response.model_name,
                           "model_version": response.model_version, "outputs": outputs}
    header = orjson.dumps(doc)
    if not blobs:
        return web.Response(body=header, content_type=JSON)
    return web.Response(body=b"".join([header, *blobs]),
                        headers={HEADER_LENGTH: str(len(header))},
                        content_type="application/octet-stream")


class InferenceRoutes:
    """The v2 REST routes; each reads its request, asks `OpenInference` (or the classifier),
    renders."""

    def __init__(self, oip: OpenInference, classifier: ClassifierServicer,
                 read_body: Callable[[web.Request], Awaitable[bytes]],
                 read_files: Callable[[web.Request], Awaitable[list[bytes]]]) -> None:
        self.oip = oip
        self.classifier = classifier
        self.read_body = read_body
        self.read_files = read_files

    def routes(self) -> list[web.RouteDef]:
        model = "/v2/models/{name}"
        versioned = [model, model + "/versions/{version}"]
        table = [web.get("/v2", self.server_metadata),
                 web.get("/v2/health/live", self.live),
                 web.get("/v2/health/ready", self.ready),
                 web.post("/v2/repository/index", self.repository_index),
                 web.post("/v2/repository/models/{name}/load", self.load),
                 web.post("/v2/repository/models/{name}/unload", self.unload),
                 web.get("/v2/models/stats", self.statistics)]
        for path in versioned:
            table += [web.get(path, self.model_metadata),
                      web.get(path + "/ready", self.model_ready),
                      web.get(path + "/config", self.model_config),
                      web.get(path + "/stats", self.statistics),
                      web.post(path + "/infer", self.infer),
                      web.post(path + "/classify", self.classify)]
        table += [web.get("/v1/models/{name}", self.v1_model),
                  web.post("/v1/models/{name}:predict", self.v1_predict)]
        for kind in ("system", "cuda"):
            base = f"/v2/{kind}sharedmemory"
            table += [web.get(base + "/status", self.shm_status),
                      web.get(base + "/region/{region}/status", self.shm_status),
                      web.post(base + "/region/{region}/register", self.shm_register),
                      web.post(base + "/unregister", self.shm_unregister),
                      web.post(base + "/region/{region}/unregister", self.shm_unregister)]
        return table

    async def server_metadata(self, request: web.Request) -> web.Response:
        return json_response(proto_json(await self.oip.ServerMetadata(
            pb.ServerMetadataRequest())))

    async def live(self, request: web.Request) -> web.Response:
        """The protocol's bodies with the status Triton's clients read; not ready is 503,
        as KServe answers, so probes and load balancers take the instance out."""
        return json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ready = (await self.oip.ServerReady(pb.ServerReadyRequest())).ready
        return json_response({"ready": ready}, 200 if ready else 503)

    async def model_ready(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        ready = (await self.oip.ModelReady(pb.ModelReadyRequest(
            name=name, version=request.match_info.get("version", "")))).ready
        return json_response({"name": name, "ready": ready}, 200 if ready else 503)

    async def model_metadata(self, request: web.Request) -> web.Response:
        return json_response(proto_json(await self.oip.ModelMetadata(pb.ModelMetadataRequest(
            name=request.match_info["name"], version=request.match_info.get("version", "")))))

    async def model_config(self, request: web.Request) -> web.Response:
        """The configuration itself, as Triton's HTTP API answers it (not wrapped)."""
        answer = await self.oip.ModelConfig(pb.ModelConfigRequest(
            name=request.match_info["name"], version=request.match_info.get("version", "")))
        return json_response(proto_json(answer.config))

    async def statistics(self, request: web.Request) -> web.Response:
        return json_response(proto_json(await self.oip.ModelStatistics(
            pb.ModelStatisticsRequest(name=request.match_info.get("name", ""),
                                      version=request.match_info.get("version", "")))))

    async def repository_index(self, request: web.Request) -> web.Response:
        body = await self.read_body(request)
        ready = bool(body) and _object(_loads(body), "the request").get("ready") is True
        answer = await self.oip.RepositoryIndex(pb.RepositoryIndexRequest(ready=ready))
        return json_response([proto_json(m) for m in answer.models])

    async def load(self, request: web.Request) -> web.Response:
        body = await self.read_body(request)
        if body and _object(_loads(body), "the request").get("parameters"):
            invalid("load parameters are not supported: edit the repository, then load")
        await self.oip.RepositoryModelLoad(pb.RepositoryModelLoadRequest(
            model_name=request.match_info["name"]))
        return web.Response(status=200)

    async def unload(self, request: web.Request) -> web.Response:
        await self.read_body(request)
        await self.oip.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(
            model_name=request.match_info["name"]))
        return web.Response(status=200)

    async def infer(self, request: web.Request) -> web.Response:
        body = await self.read_body(request)
        message, binary = await off_loop(len(body), parse_infer, body,
                                         request.headers.get(HEADER_LENGTH),
                                         request.match_info["name"],
                                         request.match_info.get("version", ""))
        del body
        answer = await self.oip.infer(message, "http", self._timeout(request))
        return render_infer(answer, binary)

    async def classify(self, request: web.Request) -> web.Response:
        """Encoded images in (the body, or multipart files), labels and probabilities out;
        `top_k` from the query (default 1)."""
        if request.content_type.startswith("multipart/"):
            images = await self.read_files(request)
        else:
            images = [await self.read_body(request)]
        if not any(images):
            invalid("the request holds no image: post its bytes (image/png, image/jpeg, ...) "
                    "or a multipart/form-data body of images")
        top_k = request.query.get("top_k", "1")
        if not top_k.isdigit():
            invalid(f"top_k must be a positive integer, got {shown(top_k, 20)}")
        answer = await self.classifier.predict(cpb.PredictRequest(
            model=request.match_info["name"], version=request.match_info.get("version", ""),
            top_k=int(top_k), images=[cpb.Image(encoded=image) for image in images]),
            "http", self._timeout(request))
        return json_response(proto_json(answer))

    async def v1_model(self, request: web.Request) -> web.Response:
        """KServe's v1 protocol: the model's readiness."""
        name = request.match_info["name"]
        ready = (await self.oip.ModelReady(pb.ModelReadyRequest(name=name))).ready
        return json_response({"name": name, "ready": ready}, 200 if ready else 503)

    async def v1_predict(self, request: web.Request) -> web.Response:
        """KServe's v1 protocol: `{"instances": [...]}` in, `{"predictions": [...]}` out.
        Instances `{"b64": <encoded image>}` are classified (label, index, probability);
        others are rows of a single-input model's tensor, answered with its first output."""
        name = request.match_info["name"]
        body = await self.read_body(request)
        size = len(body)
        doc = _object(await off_loop(size, _loads, body), "the request")
        del body
        instances = doc.get("instances")
        if not isinstance(instances, list) or not instances:
            invalid("the request needs a non-empty 'instances' list")
        if all(isinstance(i, dict) and set(i) == {"b64"} for i in instances):
            try:
                images = [b64decode(str(i["b64"]), validate=True) for i in instances]
            except (binascii.Error, ValueError) as exc:
                invalid(f"an instance's b64 is not base64: {exc}")
            answer = await self.classifier.predict(cpb.PredictRequest(
                model=name, top_k=1, images=[cpb.Image(encoded=image) for image in images]),
                "http", self._timeout(request))
            return json_response({"predictions": [
                {"label": c.predictions[0].label, "index": c.predictions[0].index,
                 "probability": c.predictions[0].probability}
                for c in answer.classifications]})
        meta = await self.oip.ModelMetadata(pb.ModelMetadataRequest(name=name))
        if len(meta.inputs) != 1:
            invalid(f"model {shown(name, 64)} takes {len(meta.inputs)} inputs; v1 instances "
                    "fit single-input models: use the v2 protocol")
        (spec,) = meta.inputs
        dtype = NUMPY_DTYPES.get(spec.datatype)
        if dtype is None:
            invalid(f"input datatype {spec.datatype} cannot travel as v1 instances")
        rows = await off_loop(size, _rows, instances, dtype, spec.datatype)
        message = pb.ModelInferRequest(model_name=name, inputs=[
            pb.ModelInferRequest.InferInputTensor(name=spec.name, datatype=spec.datatype,
                                                  shape=list(rows.shape))],
            raw_input_contents=[rows.tobytes()])
        result = await self.oip.infer(message, "http", self._timeout(request))
        first = result.outputs[0]
        values = np.frombuffer(result.raw_output_contents[0], NUMPY_DTYPES[first.datatype])
        return json_response({"predictions": values.reshape(tuple(first.shape)).tolist()})

    async def shm_status(self, request: web.Request) -> web.Response:
        region = request.match_info.get("region", "")
        if "/cudasharedmemory" in request.path:
            cuda = await self.oip.CudaSharedMemoryStatus(
                pb.CudaSharedMemoryStatusRequest(name=region))
            return json_response([proto_json(r) for r in cuda.regions.values()])
        system = await self.oip.SystemSharedMemoryStatus(
            pb.SystemSharedMemoryStatusRequest(name=region))
        return json_response([proto_json(r) for r in system.regions.values()])

    async def shm_register(self, request: web.Request) -> web.Response:
        doc = _object(_loads(await self.read_body(request)), "the request")
        region = request.match_info["region"]
        try:
            if "/cudasharedmemory" in request.path:
                handle = _object(doc.get("raw_handle"), "raw_handle").get("b64")
                await self.oip.CudaSharedMemoryRegister(pb.CudaSharedMemoryRegisterRequest(
                    name=region, raw_handle=b64decode(str(handle), validate=True),
                    device_id=int(doc.get("device_id", 0)), byte_size=int(doc["byte_size"])))
            else:
                await self.oip.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(
                    name=region, key=str(doc["key"]), offset=int(doc.get("offset", 0)),
                    byte_size=int(doc["byte_size"])))
        except (KeyError, ValueError, TypeError, binascii.Error) as exc:
            invalid(f"a registration needs key (system) or raw_handle (CUDA) and byte_size: "
                    f"{type(exc).__name__} {exc}")
        return web.Response(status=200)

    async def shm_unregister(self, request: web.Request) -> web.Response:
        await self.read_body(request)
        region = request.match_info.get("region", "")
        if "/cudasharedmemory" in request.path:
            await self.oip.CudaSharedMemoryUnregister(
                pb.CudaSharedMemoryUnregisterRequest(name=region))
        else:
            await self.oip.SystemSharedMemoryUnregister(
                pb.SystemSharedMemoryUnregisterRequest(name=region))
        return web.Response(status=200)

    def _timeout(self, request: web.Request) -> float | None:
        """The client's deadline: a `timeout` header or query parameter, in seconds."""
        given = request.headers.get("timeout") or request.query.get("timeout")
        if given is None:
            return None
        try:
            seconds = float(given)
        except ValueError:
            invalid(f"timeout must be seconds, got {shown(given, 20)}")
        if not seconds > 0:
            invalid(f"timeout must be positive, got {shown(given, 20)}")
        return seconds


def _rows(instances: list[Any], dtype: np.dtype[Any], datatype: str) -> np.ndarray:
    try:
        return np.asarray(instances, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        invalid(f"the instances are not rows of {datatype} values ({exc})")


async def off_loop(size: int, parse: Callable[..., T], *args: Any) -> T:
    """`parse(*args)` for a body of `size` bytes: inline when small, in a thread when large,
    so that a 64 MB JSON body (about a second of parsing) does not stop every other call
    on the event loop, gRPC's included."""
    if size <= INLINE_PARSE_BYTES:
        return parse(*args)
    return await asyncio.to_thread(parse, *args)


def _loads(text: bytes) -> object:
    """JSON, charged to the call first for what parsing makes of it: up to about 16 times
    its text (the two bytes of `0,` become a float object and a list slot, 32 bytes)."""
    call = CURRENT_CALL.get()
    if call is not None:
        call.charge(JSON_EXPANSION * len(text), "the parsed JSON")
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        invalid(f"the request is not valid JSON: {exc}")
