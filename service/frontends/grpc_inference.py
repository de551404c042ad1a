"""The Open Inference Protocol's gRPC binding: each RPC's message becomes the core's
types (core.oip), and the answer becomes the RPC's message; nothing else happens here.

`ModelStreamInfer` is the one call with gRPC of its own: a bidirectional stream whose
requests each run as a call of their own (admitted, batched and counted like a unary one).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Coroutine, Mapping
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message
from grpc.aio import EOF
from grpc.aio import ServicerContext as Context

from protos import grpc_service_pb2 as pb
from protos import model_config_pb2 as mc
from service.core.admission import Call
from service.core.oip import InputTensor, OipRequest, OipResponse, OpenInference, Parameter
from service.core.oip import RequestedOutput as Wanted
from service.status import ServingError, Status, outcome

log = logging.getLogger(__name__)
STREAM_IN_FLIGHT = 64
"""Requests of one ModelStreamInfer stream in progress at once."""
M = TypeVar("M", bound=Message)


def parameters(given: Mapping[str, pb.InferParameter]) -> dict[str, Parameter | None]:
    """The protocol's parameters as plain values (None where a parameter holds none)."""
    values: dict[str, Parameter | None] = {}
    for key, parameter in given.items():
        kind = parameter.WhichOneof("parameter_choice")
        values[key] = None if kind is None else getattr(parameter, kind)
    return values


def oip_request(message: pb.ModelInferRequest) -> OipRequest:
    inputs = []
    for tensor in message.inputs:
        contents = ({f.name: values for f, values in tensor.contents.ListFields()}
                    if tensor.HasField("contents") else None)
        inputs.append(InputTensor(tensor.name, tensor.datatype, tensor.shape,
                                  parameters(tensor.parameters) if tensor.parameters else {},
                                  contents))
    return OipRequest(
        model=message.model_name, version=message.model_version, id=message.id,
        inputs=inputs, raw=message.raw_input_contents,
        outputs=[Wanted(o.name, parameters(o.parameters) if o.parameters else {})
                 for o in message.outputs])


def infer_response(answer: OipResponse) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=answer.model, model_version=answer.version,
                                     id=answer.id)
    for output in answer.outputs:
        tensor = response.outputs.add(name=output.name, datatype=output.datatype,
                                      shape=output.shape)
        if output.region is not None:
            tensor.parameters["shared_memory_region"].string_param = output.region
            tensor.parameters["shared_memory_byte_size"].int64_param = output.written
    # One entry per output, empty for those in shared memory, as Triton's clients index them.
    response.raw_output_contents.extend([output.raw for output in answer.outputs])
    return response


def message(doc: dict[str, Any] | list[Any], into: M) -> M:
    """One of the protocol's JSON documents as its gRPC message (the same field names)."""
    return json_format.ParseDict(doc, into)


class Stream:
    """One ModelStreamInfer stream. Its requests are read in turn; each is admitted as a
    call of its own and answered by a task of its own, which awaits the core and writes
    the answer (one write at a time, in the order answers arrive).

    At most STREAM_IN_FLIGHT requests are running or waiting to be written at once: past
    it the stream is not read, and HTTP/2 flow control holds the client (one that reads
    no answers holds 64). When the client half-closes, the stream ends once every
    answer is written; when it goes away, what is still in progress is cancelled.
    """

    def __init__(self, oip: OpenInference, context: Context, call: Call) -> None:
        self.oip = oip
        self.context = context
        self.call = call
        self.answering: set[asyncio.Task[None]] = set()
        self.room = asyncio.Semaphore(STREAM_IN_FLIGHT)
        self.writing = asyncio.Lock()
        self.reader: asyncio.Task[Any] | None = None

    async def serve(self) -> None:
        self.reader = asyncio.current_task()
        try:
            while True:
                await self.room.acquire()
                request = await self.context.read()
                if request is EOF:
                    break
                task = asyncio.create_task(self._answer(request))
                self.answering.add(task)
                task.add_done_callback(self._answered)
            while self.answering:
                await asyncio.wait(list(self.answering))
        finally:
            for task in self.answering:  # the client went away: nobody to answer
                task.cancel()

    async def _answer(self, request: pb.ModelInferRequest) -> None:
        try:
            call = self.call.sibling("oip_stream")
        except ServingError as exc:
            await self._write(_stream_error(request, exc))
            return
        try:
            call.charge(2 * request.ByteSize(), "the request message")
            answer = await self.oip.infer(oip_request(request), "oip_stream",
                                          self.context.time_remaining(), call)
            response = pb.ModelStreamInferResponse(infer_response=infer_response(answer))
        except BaseException as exc:  # the stream goes on; its client is told
            call.end(outcome(exc))
            if not isinstance(exc, Exception):
                raise
            response = _stream_error(request, exc)
        else:
            call.end(Status.OK)
        await self._write(response)

    async def _write(self, response: pb.ModelStreamInferResponse) -> None:
        async with self.writing:
            await self.context.write(response)

    def _answered(self, task: asyncio.Task[None]) -> None:
        """Room for one more; a write that failed ends the stream (the client is gone)."""
        self.answering.discard(task)
        self.room.release()
        if not task.cancelled() and task.exception() is not None and self.reader:
            self.reader.cancel()


def _stream_error(request: pb.ModelInferRequest | OipRequest, exc: Exception
                  ) -> pb.ModelStreamInferResponse:
    """The stream's way of refusing one request: its error text, and its id."""
    if isinstance(exc, ServingError):
        error = f"{exc.status.name}: {exc}"
    else:
        log.error("a ModelStreamInfer request failed", exc_info=exc)
        error = f"INTERNAL: internal error ({type(exc).__name__})"
    if isinstance(request, OipRequest):
        model, version, id_ = request.model, request.version, request.id
    else:
        model, version, id_ = request.model_name, request.model_version, request.id
    return pb.ModelStreamInferResponse(error_message=error, infer_response=pb.ModelInferResponse(
        model_name=model, model_version=version, id=id_))


class InferenceServicer:
    """Registered with the generated `add_GRPCInferenceServiceServicer_to_server`; the
    edge hands each method the call it admitted."""

    def __init__(self, oip: OpenInference) -> None:
        self.oip = oip

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context, call: Call
                         ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context, call: Call
                          ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.oip.server_ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context, call: Call
                         ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.oip.model_ready(request.name, request.version))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context,
                             call: Call) -> pb.ServerMetadataResponse:
        return message(self.oip.server_metadata(), pb.ServerMetadataResponse())

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context,
                            call: Call) -> pb.ModelMetadataResponse:
        return message(self.oip.model_metadata(request.name, request.version, call),
                       pb.ModelMetadataResponse())

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context, call: Call
                         ) -> pb.ModelInferResponse:
        return infer_response(await self.oip.infer(oip_request(request), "oip",
                                                   context.time_remaining(), call))

    def ModelStreamInfer(self, requests: AsyncIterator[pb.ModelInferRequest],
                         context: Context, call: Call) -> Coroutine[Any, Any, None]:
        """Each request runs as a call of its own, batched with every other; answers go
        back as they finish, each with its request's id (see `Stream`). The stream's own
        coroutine, for the edge to await: no frame of this method's between them."""
        return Stream(self.oip, context, call).serve()

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context, call: Call
                          ) -> pb.ModelConfigResponse:
        config = message(self.oip.model_config(request.name, request.version, call),
                         mc.ModelConfig())
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Context,
                              call: Call) -> pb.ModelStatisticsResponse:
        return message(self.oip.model_statistics(request.name, request.version, call),
                       pb.ModelStatisticsResponse())

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context,
                              call: Call) -> pb.RepositoryIndexResponse:
        return message({"models": await self.oip.repository_index(request.ready)},
                       pb.RepositoryIndexResponse())

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest,
                                  context: Context, call: Call
                                  ) -> pb.RepositoryModelLoadResponse:
        await self.oip.load(request.model_name, list(request.parameters))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                                    context: Context, call: Call
                                    ) -> pb.RepositoryModelUnloadResponse:
        await self.oip.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    async def SystemSharedMemoryRegister(self, request: pb.SystemSharedMemoryRegisterRequest,
                                         context: Context, call: Call
                                         ) -> pb.SystemSharedMemoryRegisterResponse:
        self.oip.register_system(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryStatus(self, request: pb.SystemSharedMemoryStatusRequest,
                                       context: Context, call: Call
                                       ) -> pb.SystemSharedMemoryStatusResponse:
        return _regions(self.oip.system_status(request.name),
                        pb.SystemSharedMemoryStatusResponse())

    async def SystemSharedMemoryUnregister(
            self, request: pb.SystemSharedMemoryUnregisterRequest, context: Context, call: Call
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        self.oip.unregister_system(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryRegister(self, request: pb.CudaSharedMemoryRegisterRequest,
                                       context: Context, call: Call
                                       ) -> pb.CudaSharedMemoryRegisterResponse:
        self.oip.register_cuda(request.name, request.raw_handle, request.device_id,
                               request.byte_size)
        return pb.CudaSharedMemoryRegisterResponse()

    async def CudaSharedMemoryStatus(self, request: pb.CudaSharedMemoryStatusRequest,
                                     context: Context, call: Call
                                     ) -> pb.CudaSharedMemoryStatusResponse:
        return _regions(self.oip.cuda_status(request.name), pb.CudaSharedMemoryStatusResponse())

    async def CudaSharedMemoryUnregister(self, request: pb.CudaSharedMemoryUnregisterRequest,
                                         context: Context, call: Call
                                         ) -> pb.CudaSharedMemoryUnregisterResponse:
        self.oip.unregister_cuda(request.name)
        return pb.CudaSharedMemoryUnregisterResponse()


def _regions(regions: list[dict[str, Any]], into: M) -> M:
    """Shared memory regions as the status messages hold them: a map by name."""
    return message({"regions": {r["name"]: r for r in regions}}, into)
