"""grpc.health.v1, reflection, configuration, and the protocol stubs themselves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service.app.settings import ServiceSettings
from tests.servers import ROOT, ServerProcess


def test_health_reports_server_and_each_model(server: ServerProcess) -> None:
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.address))
    for service in ("", "inference.GRPCInferenceService", "cnnserve.v1.Classifier", "lenet",
                    "alexnet", "vgg11_bn"):
        status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as err:
        stub.Check(health_pb2.HealthCheckRequest(service="resnet"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_every_service(server: ServerProcess) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(grpc.insecure_channel(server.address))
    responses = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"inference.GRPCInferenceService", "cnnserve.v1.Classifier",
            "grpc.health.v1.Health"} <= names


def test_settings_come_from_file_then_environment(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "serve.toml"
    file.write_text('port = 9001\nmax_queue_size = 7\n[models.lenet]\nmax_batch_size = 4\n')
    monkeypatch.setenv("CNNSERVE_CONFIG_FILE", str(file))
    monkeypatch.setenv("CNNSERVE_PORT", "9100")
    settings = ServiceSettings()
    assert (settings.port, settings.max_queue_size) == (9100, 7)
    assert settings.overrides("lenet").max_batch_size == 4
    assert ServiceSettings(max_batch_size=8).overrides("alexnet").max_batch_size == 8


@pytest.mark.parametrize(("env", "message"), [
    ({"CNNSERVE_PORT": "70000"}, "less than or equal to 65535"),
    ({"CNNSERVE_DEVICE": "tpu"}, "device must be auto, cpu, cuda or cuda:N"),
    ({"CNNSERVE_DEVICE": "cuda:x"}, "got 'cuda:x'"),
    ({"CNNSERVE_MODELS": '{"lenet": {"max_batch_size": 0}}'}, "greater than or equal to 1"),
    ({"CNNSERVE_WORKERS": "2", "CNNSERVE_PORT": "0"}, "set explicit ports"),
])
def test_invalid_configuration_fails_at_start_with_the_reason(
        served_repo: Path, env: dict[str, str], message: str) -> None:
    result = subprocess.run([sys.executable, "-m", "service", "--repo", str(served_repo)],
                            cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "invalid configuration" in result.stderr and message in result.stderr


def test_missing_repository_is_a_clear_error(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "service", "--repo", str(tmp_path / "none"),
                             "--port", "0", "--no-metrics"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0
    assert f"model repository {tmp_path / 'none'} does not exist" in result.stderr


def test_a_broken_model_is_unready_while_the_others_serve(
        served_repo: Path, tmp_path: Path, server_factory: Callable[..., ServerProcess]) -> None:
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(served_repo, repo)
    model = repo / "alexnet" / "1" / "model.onnx"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])  # truncated file
    config = repo / "vgg11_bn" / "config.json"  # a config that contradicts its model
    fields = json.loads(config.read_text())
    fields["inputs"][0]["shape"] = [1, 28, 28]
    config.write_text(json.dumps(fields))
    server = server_factory(repo)
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.address))

    def status(name: str) -> int:
        return stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status

    assert status("alexnet") == health_pb2.HealthCheckResponse.NOT_SERVING
    assert status("vgg11_bn") == health_pb2.HealthCheckResponse.NOT_SERVING
    assert status("lenet") == health_pb2.HealthCheckResponse.SERVING
    assert status("") == health_pb2.HealthCheckResponse.NOT_SERVING  # not every model ready
    log = "".join(server.lines)
    assert "model alexnet version 1 not served" in log
    assert "config says FP32 [-1, 1, 28, 28]" in log


def test_generated_stubs_are_up_to_date() -> None:
    result = subprocess.run([sys.executable, "-m", "protos.generate", "--check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


_DUMP = """
import json
from protos import grpc_service_pb2 as pb
from protos import model_config_pb2 as mc
def fields(d, prefix=""):
    out = {}
    for f in d.fields:
        out[prefix + d.name + "." + f.name] = [f.number, f.type, f.is_repeated]
    for n in d.nested_types:
        if not n.GetOptions().map_entry:
            out.update(fields(n, prefix + d.name + "."))
    return out
result = {}
for m in [*pb.DESCRIPTOR.message_types_by_name.values(),
          *mc.DESCRIPTOR.message_types_by_name.values()]:
    result.update(fields(m))
result["enums"] = {e.name: {v.name: v.number for v in e.values}
                   for e in mc.DESCRIPTOR.enum_types_by_name.values()}
svc = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
result["methods"] = [m.full_name for m in svc.methods]
print(json.dumps(result))
"""


def test_our_protocol_is_wire_compatible_with_tritonclient() -> None:
    """Every field we declare has Triton's number and type (checked in a separate process:
    both files define package `inference`, which one descriptor pool cannot hold twice)."""
    from tritonclient.grpc import model_config_pb2 as triton_config
    from tritonclient.grpc import service_pb2 as triton

    ours = json.loads(subprocess.run([sys.executable, "-c", _DUMP], cwd=ROOT, check=True,
                                     capture_output=True, text=True, timeout=60).stdout)
    methods = ours.pop("methods")
    for enum, values in ours.pop("enums").items():
        theirs_enum = triton_config.DESCRIPTOR.enum_types_by_name[enum]
        assert values == {v.name: v.number for v in theirs_enum.values}, enum
    theirs_svc = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert set(methods) <= {m.full_name for m in theirs_svc.methods}
    for key, (number, ftype, repeated) in ours.items():
        message_path, field_name = key.rsplit(".", 1)
        top = message_path.split(".")[0]
        descriptor = (triton.DESCRIPTOR.message_types_by_name.get(top)
                      or triton_config.DESCRIPTOR.message_types_by_name[top])
        for nested in message_path.split(".")[1:]:
            descriptor = descriptor.nested_types_by_name[nested]
        theirs = descriptor.fields_by_name[field_name]
        assert (theirs.number, theirs.type) == (number, ftype), key
        assert theirs.is_repeated == repeated, key
    assert "ModelInferRequest.raw_input_contents" in ours
    assert "ModelConfig.dynamic_batching" in ours and "ModelInput.dims" in ours
