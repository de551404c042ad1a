"""An MLServer runtime serving a model.onnx with onnxruntime, and the settings files that
serve it: MLServer's own front doors, adaptive batching and inference worker pool. Run in
the venv `loadtests.peers` builds for it (`mlserver start DIR`)."""

from __future__ import annotations

import json
from pathlib import Path

from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

from loadtests.peer_servers.onnx_session import session


class OnnxModel(MLModel):
    async def load(self) -> bool:
        extra = self.settings.parameters.extra if self.settings.parameters else None
        options = extra or {}
        self._session = session(str(self.settings.parameters.uri),
                                int(options.get("intra_op_threads", 0)),
                                int(options.get("inter_op_threads", 1)))
        (self._input,), (self._output,) = self._session.get_inputs(), self._session.get_outputs()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0])
        y = self._session.run([self._output.name], {self._input.name: x})[0]
        return InferenceResponse(model_name=self.name, id=payload.id,
                                 outputs=[NumpyCodec.encode_output(self._output.name, y)])


def write_settings(folder: Path, models: dict[str, Path], grpc_port: int, http_port: int,
                   metrics_port: int, max_batch_size: int = 32,
                   max_batch_time_s: float = 0.002) -> None:
    """settings.json and one model-settings.json per model under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "grpc_port": grpc_port, "http_port": http_port,
        "metrics_port": metrics_port, "debug": False}))
    for name, path in models.items():
        (folder / name).mkdir(exist_ok=True)
        (folder / name / "model-settings.json").write_text(json.dumps({
            "name": name, "implementation": "loadtests.peer_servers.mlserver_onnx.OnnxModel",
            "max_batch_size": max_batch_size, "max_batch_time": max_batch_time_s,
            "parameters": {"uri": str(path)}}))


def main() -> None:
    """Write the settings, run `mlserver start` beside this interpreter, print the ready
    line once MLServer answers ready, and pass SIGTERM on."""
    import argparse
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    from service.app.ready import announce, ready_line

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("models", nargs="+", help="name=path/to/model.onnx")
    p.add_argument("--folder", type=Path, required=True)
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--metrics-port", type=int, required=True)
    args = p.parse_args()
    write_settings(args.folder, {s.split("=", 1)[0]: Path(s.split("=", 1)[1])
                                 for s in args.models},
                   args.grpc_port, args.http_port, args.metrics_port)
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlserver"), "start",
                               str(args.folder)])
    signal.signal(signal.SIGTERM, lambda *_: server.terminate())
    deadline = time.monotonic() + 120
    while server.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(
                    f"http://127.0.0.1:{args.http_port}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    announce(ready_line("mlserver", "127.0.0.1", args.grpc_port))
                    break
        except OSError:
            time.sleep(0.5)
    raise SystemExit(server.wait())


if __name__ == "__main__":
    main()
