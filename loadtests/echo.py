"""A trivial Open Inference Protocol server: the transport's own limit on this machine.

`ModelInfer` answers zeros of the right shape without running a model, through the
same grpc.aio server options and the same client path as the real service, so the
benchmark can say how much of a request's cost is gRPC itself.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc

from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from service.ready import ready_line
from service.server import server_options
from service.settings import ServiceSettings

CLASSES = 10


class EchoServicer(pb_grpc.GRPCInferenceServiceServicer):
    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ModelInferResponse:
        rows = request.inputs[0].shape[0] if request.inputs else 1
        return pb.ModelInferResponse(
            model_name=request.model_name, model_version="1", id=request.id,
            outputs=[pb.ModelInferResponse.InferOutputTensor(name="logits", datatype="FP32",
                                                            shape=[rows, CLASSES])],
            raw_output_contents=[bytes(4 * CLASSES * rows)])


async def serve(host: str, port: int) -> None:
    server = grpc.aio.server(options=server_options(ServiceSettings(), reuse_port=False))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(EchoServicer(), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(ready_line("echo", host, bound), flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m loadtests.echo", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
