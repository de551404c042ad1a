"""NVIDIA Triton as bundled in nvidia-pytriton, serving model.onnx files through its
Python backend: Triton's C++ front door and dynamic batcher, a Python function calling
onnxruntime behind them. Run in the venv `loadtests.peers` builds for it."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

from loadtests.peer_servers.onnx_session import session
from service.app.ready import announce, ready_line


def bind(triton: Triton, name: str, path: Path, args: argparse.Namespace) -> None:
    sess = session(str(path), args.intra_op_threads, args.inter_op_threads)
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        return {out.name: sess.run([out.name], {inp.name: inputs[inp.name]})[0]}

    triton.bind(
        model_name=name, infer_func=infer,
        inputs=[Tensor(name=inp.name, dtype=np.float32, shape=tuple(inp.shape[1:]))],
        outputs=[Tensor(name=out.name, dtype=np.float32, shape=tuple(out.shape[1:]))],
        config=ModelConfig(max_batch_size=args.max_batch_size, batcher=DynamicBatcher(
            max_queue_delay_microseconds=args.max_queue_delay_us,
            preferred_batch_size=[8, 16, 32])),
        strict=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("models", nargs="+", help="name=path/to/model.onnx")
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--metrics-port", type=int, required=True)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-queue-delay-us", type=int, default=2000)
    p.add_argument("--intra-op-threads", type=int, default=0)
    p.add_argument("--inter-op-threads", type=int, default=1)
    args = p.parse_args()
    config = TritonConfig(grpc_address="127.0.0.1", grpc_port=args.grpc_port,
                          http_address="127.0.0.1", http_port=args.http_port,
                          metrics_address="127.0.0.1", metrics_port=args.metrics_port)
    # PyTriton 0.7 guards statistics (which perf_analyzer reads) with a token by default.
    with Triton(config=config,
                security_config=TritonSecurityConfig(restricted_endpoints=[])) as triton:
        for spec in args.models:
            name, path = spec.split("=", 1)
            bind(triton, name, Path(path), args)
        triton.run()
        announce(ready_line("pytriton", "127.0.0.1", args.grpc_port))
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()


if __name__ == "__main__":
    main()
