"""A trivial Open Inference Protocol server: the transport's own limit on this machine.

`ModelInfer` (and each request of `ModelStreamInfer`) answers zeros of the right shape
without running a model, through the same grpc.aio server options and the same client
path as the real service, so the benchmark can say how much of a request's cost is gRPC
itself. It describes every model name as an image classifier (`--input-shape`, 10
classes, batches of up to 32) in `ModelMetadata` and `ModelConfig`, and answers empty
statistics, so that perf_analyzer drives it as it drives the service. With `--http-port`
it also answers the REST binding's binary-tensor infer (zeros, as Triton's extension
frames them), on aiohttp as the service does: REST's own floor.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from collections.abc import AsyncIterator

import grpc
import orjson
from aiohttp import web

from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from protos import model_config_pb2 as mc
from service.app.ready import ready_line
from service.app.server import server_options
from service.app.settings import ServiceSettings

CLASSES = 10
MAX_BATCH = 32


class EchoServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, input_shape: list[int]) -> None:
        self.input_shape = input_shape
        self.described: dict[str, None] = {}
        """Model names asked about, so statistics for "every model" can list them."""
        self.answered = 0
        """Requests answered, all models together: perf_analyzer looks for a count that
        moved to find the version it measured."""

    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="echo", version="0", extensions=["statistics"])

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        if len(self.described) < 100:
            self.described[request.name] = None
        meta = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=request.name, versions=["1"], platform="onnxruntime_onnx",
            inputs=[meta(name="input", datatype="FP32", shape=[-1, *self.input_shape])],
            outputs=[meta(name="logits", datatype="FP32", shape=[-1, CLASSES])])

    async def ModelConfig(self, request: pb.ModelConfigRequest,
                          context: grpc.aio.ServicerContext) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=mc.ModelConfig(
            name=request.name, platform="onnxruntime_onnx", max_batch_size=MAX_BATCH,
            input=[mc.ModelInput(name="input", data_type="TYPE_FP32", dims=self.input_shape)],
            output=[mc.ModelOutput(name="logits", data_type="TYPE_FP32", dims=[CLASSES])]))

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest,
                              context: grpc.aio.ServicerContext) -> pb.ModelStatisticsResponse:
        names = [request.name] if request.name else list(self.described)
        return pb.ModelStatisticsResponse(model_stats=[
            pb.ModelStatistics(name=name, version="1", last_inference=int(time.time() * 1e3),
                               inference_count=self.answered, execution_count=self.answered,
                               inference_stats=pb.InferStatistics(
                                   success=pb.StatisticDuration(count=self.answered)))
            for name in names])

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ModelInferResponse:
        return self._answer(request)

    async def ModelStreamInfer(self, requests: AsyncIterator[pb.ModelInferRequest],
                               context: grpc.aio.ServicerContext
                               ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Each request answered in turn on the stream: the transport's own cost when
        gRPC's per-call work is paid once per stream, not once per request."""
        async for request in requests:
            yield pb.ModelStreamInferResponse(infer_response=self._answer(request))

    def _answer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        rows = request.inputs[0].shape[0] if request.inputs else 1
        self.answered += 1
        return pb.ModelInferResponse(
            model_name=request.model_name, model_version="1", id=request.id,
            outputs=[pb.ModelInferResponse.InferOutputTensor(name="logits", datatype="FP32",
                                                            shape=[rows, CLASSES])],
            raw_output_contents=[bytes(4 * CLASSES * rows)])


HEADER_LENGTH = "Inference-Header-Content-Length"


async def rest_infer(request: web.Request) -> web.Response:
    """POST /v2/models/{name}/infer: zeros of the right shape, as binary data."""
    body = await request.read()
    split = int(request.headers.get(HEADER_LENGTH, len(body)))
    doc = orjson.loads(body[:split])
    rows = doc["inputs"][0]["shape"][0]
    size = 4 * CLASSES * rows
    header = orjson.dumps({
        "id": doc.get("id", ""), "model_name": request.match_info["name"],
        "model_version": "1", "outputs": [{"name": "logits", "datatype": "FP32",
                                           "shape": [rows, CLASSES],
                                           "parameters": {"binary_data_size": size}}]})
    return web.Response(body=header + bytes(size), headers={HEADER_LENGTH: str(len(header))},
                        content_type="application/octet-stream")


async def serve(host: str, port: int, input_shape: list[int], http_port: int | None = None
                ) -> None:
    server = grpc.aio.server(options=server_options(ServiceSettings(), reuse_port=False))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(EchoServicer(input_shape), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    runner = None
    if http_port is not None:
        app = web.Application()
        app.add_routes([web.post("/v2/models/{name}/infer", rest_infer)])
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, http_port).start()
    print(ready_line("echo", host, bound), flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    if runner is not None:
        await runner.cleanup()
    await server.stop(1)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m loadtests.echo", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--input-shape", default="1,28,28",
                   help="the input's shape without the batch dimension, as in ModelConfig")
    p.add_argument("--http-port", type=int, default=None,
                   help="also answer REST binary-tensor infer on this port")
    args = p.parse_args()
    asyncio.run(serve(args.host, args.port, [int(d) for d in args.input_shape.split(",")],
                      args.http_port))


if __name__ == "__main__":
    main()
