"""Start-up failures end the process with exit 1 and one line that says what went wrong."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import ROOT, free_port


@pytest.mark.parametrize("port_flag", ["--http-port", "--port", "--metrics-port"])
def test_a_port_in_use_is_one_line_naming_it_and_exit_1(served_repo: Path,
                                                        port_flag: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports = {"--port": "0", "--http-port": str(free_port()),
                 "--metrics-port": str(free_port()), "--probe-port": str(free_port()),
                 port_flag: str(busy)}
        result = subprocess.run(
            [sys.executable, "-m", "service", "--repo", str(served_repo), "--host", "127.0.0.1",
             "--device", "cpu",
             *[arg for flag, port in ports.items() for arg in (flag, port)]],
            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    # gRPC core logs its own line when a bind fails (E1203 ... add_port.cc).
    errors = [line for line in result.stderr.splitlines()
              if " INFO " not in line and "add_port.cc" not in line]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("error: ") and str(busy) in errors[0], errors
    assert "Traceback" not in result.stderr


LANE_CHECK = """
from grpc_health.v1 import health_pb2
from protos import classifier_pb2, grpc_service_pb2
from service.app.server import LANES
served = {f"/{service.full_name}/{method.name}"
          for module in (grpc_service_pb2, classifier_pb2, health_pb2)
          for service in module.DESCRIPTOR.services_by_name.values()
          for method in service.methods}
print(sorted(LANES - served), "/inference.GRPCInferenceService/ModelInfer" in LANES)
"""


def test_every_lane_names_a_method_the_server_serves() -> None:
    """A misspelt lane would silently leave its method in the shared generic lane. (In a
    process of its own: tritonclient's protos, loaded here, define the same messages.)"""
    result = subprocess.run([sys.executable, "-c", LANE_CHECK], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.stdout.split() == ["[]", "True"], result.stdout + result.stderr
