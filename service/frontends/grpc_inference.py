"""The Open Inference Protocol's gRPC binding: each RPC hands its message to `OpenInference`.

`ModelStreamInfer` is the one call with gRPC of its own: a bidirectional stream whose
requests each run as a call of their own (admitted, batched and counted by the edge).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from grpc.aio import ServicerContext as Context

from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from service.edge.grpc_edge import request_in_stream
from service.frontends.oip import OpenInference
from service.status import ServingError

log = logging.getLogger(__name__)
STREAM_IN_FLIGHT = 64
"""Requests of one ModelStreamInfer stream in progress at once."""


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, oip: OpenInference) -> None:
        self.oip = oip

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context
                         ) -> pb.ServerLiveResponse:
        return await self.oip.ServerLive(request)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context
                          ) -> pb.ServerReadyResponse:
        return await self.oip.ServerReady(request)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context
                         ) -> pb.ModelReadyResponse:
        return await self.oip.ModelReady(request)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context
                             ) -> pb.ServerMetadataResponse:
        return await self.oip.ServerMetadata(request)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context
                            ) -> pb.ModelMetadataResponse:
        return await self.oip.ModelMetadata(request)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context
                         ) -> pb.ModelInferResponse:
        return await self.oip.infer(request, "oip", context.time_remaining())

    async def ModelStreamInfer(self, requests: AsyncIterator[pb.ModelInferRequest],
                               context: Context
                               ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Each request runs as a call of its own, batched with every other; answers go
        back as they finish, each with its request's id. At most STREAM_IN_FLIGHT are
        running or waiting to be written at once: past it the stream is not read, and
        HTTP/2 flow control holds the client (one that reads no answers holds 64)."""
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(STREAM_IN_FLIGHT)
        running: set[asyncio.Task[None]] = set()

        async def answer(request: pb.ModelInferRequest) -> None:
            try:
                async with request_in_stream("oip_stream") as call:
                    call.charge(2 * request.ByteSize(), "the request message")
                    response = await self.oip.infer(request, "oip_stream",
                                                 context.time_remaining())
                answers.put_nowait(pb.ModelStreamInferResponse(infer_response=response))
            except Exception as exc:  # noqa: BLE001 - the stream goes on; its client is told
                if isinstance(exc, ServingError):
                    error = f"{exc.status.name}: {exc}"
                else:
                    log.exception("a ModelStreamInfer request failed")
                    error = f"INTERNAL: internal error ({type(exc).__name__})"
                answers.put_nowait(pb.ModelStreamInferResponse(
                    error_message=error, infer_response=pb.ModelInferResponse(
                        model_name=request.model_name, model_version=request.model_version,
                        id=request.id)))

        async def read() -> None:
            try:
                async for request in requests:
                    await slots.acquire()
                    task = asyncio.create_task(answer(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                await asyncio.gather(*running)
            finally:
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await answers.get()) is not None:
                yield item  # returns once written
                slots.release()
            await reader  # a request message that was not valid protobuf: the stream's error
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context
                          ) -> pb.ModelConfigResponse:
        return await self.oip.ModelConfig(request)

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Context
                              ) -> pb.ModelStatisticsResponse:
        return await self.oip.ModelStatistics(request)

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context
                              ) -> pb.RepositoryIndexResponse:
        return await self.oip.RepositoryIndex(request)

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest,
                                  context: Context) -> pb.RepositoryModelLoadResponse:
        return await self.oip.RepositoryModelLoad(request)

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                                    context: Context) -> pb.RepositoryModelUnloadResponse:
        return await self.oip.RepositoryModelUnload(request)

    async def SystemSharedMemoryRegister(self, request: pb.SystemSharedMemoryRegisterRequest,
                                         context: Context
                                         ) -> pb.SystemSharedMemoryRegisterResponse:
        return await self.oip.SystemSharedMemoryRegister(request)

    async def SystemSharedMemoryStatus(self, request: pb.SystemSharedMemoryStatusRequest,
                                       context: Context) -> pb.SystemSharedMemoryStatusResponse:
        return await self.oip.SystemSharedMemoryStatus(request)

    async def SystemSharedMemoryUnregister(
            self, request: pb.SystemSharedMemoryUnregisterRequest, context: Context
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        return await self.oip.SystemSharedMemoryUnregister(request)

    async def CudaSharedMemoryRegister(self, request: pb.CudaSharedMemoryRegisterRequest,
                                       context: Context) -> pb.CudaSharedMemoryRegisterResponse:
        return await self.oip.CudaSharedMemoryRegister(request)

    async def CudaSharedMemoryStatus(self, request: pb.CudaSharedMemoryStatusRequest,
                                     context: Context) -> pb.CudaSharedMemoryStatusResponse:
        return await self.oip.CudaSharedMemoryStatus(request)

    async def CudaSharedMemoryUnregister(self, request: pb.CudaSharedMemoryUnregisterRequest,
                                         context: Context
                                         ) -> pb.CudaSharedMemoryUnregisterResponse:
        return await self.oip.CudaSharedMemoryUnregister(request)
