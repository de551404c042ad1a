"""Kubernetes manifests and the KServe predictor: schema-valid and consistent with the code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.settings import ServiceSettings
from tests.servers import ROOT

K8S = ROOT / "deploy" / "kubernetes"
VERSION = "1.30.0"  # the oldest Kubernetes these manifests promise (grpc probes are GA)
SETTINGS = {f"CNNSERVE_{name.upper()}" for name in ServiceSettings.model_fields}


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifests() -> list[tuple[str, dict[str, Any]]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [(f"{name}:{doc['kind']}", doc) for name in kustomization["resources"]
            for doc in documents(K8S / name)]


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {})
    if doc["kind"] == "InferenceService":
        return list(spec["predictor"]["containers"])
    if doc["kind"] in ("Deployment", "Job"):
        return list(spec["template"]["spec"]["containers"])
    return []


def test_kustomization_lists_every_manifest() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


@pytest.mark.parametrize(("name", "doc"), manifests(), ids=[n for n, _ in manifests()])
def test_manifest_is_valid_against_the_kubernetes_schema(name: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, VERSION, strict=True)


def test_kserve_predictor_containers_are_valid_pod_containers() -> None:
    (service,) = documents(K8S / "kserve" / "inferenceservice.yaml")
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"},
           "spec": {"containers": containers(service)}}
    kubernetes_validate.validate(pod, VERSION, strict=True)
    (container,) = containers(service)
    assert container["ports"][0]["name"] == "h2c"  # KServe's name for a gRPC port
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["CNNSERVE_REPO"] == "/mnt/models"  # where KServe's storage initializer copies


def test_server_probes_use_the_probe_port_and_every_env_var_is_a_setting() -> None:
    docs = manifests() + [("kserve", d) for d in documents(K8S / "kserve" /
                                                           "inferenceservice.yaml")]
    servers = [c for _, d in docs for c in containers(d) if "server" in c["image"]]
    assert len(servers) == 2
    for container in servers:
        assert container["command"] == ["python", "-m", "service"]
        names = {e["name"] for e in container["env"]}
        assert names - {"STORAGE_URI"} <= SETTINGS, names - SETTINGS
        ports = {p["containerPort"] for p in container["ports"]}
        env = {e["name"]: e["value"] for e in container["env"]}
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if probe in container:
                assert container[probe]["grpc"]["port"] in ports
                if "CNNSERVE_PROBE_PORT" in env:  # its own process: probes never queue
                    assert container[probe]["grpc"]["port"] == int(env["CNNSERVE_PROBE_PORT"])
                assert container[probe]["grpc"].get("service", "") in ("", "liveness")


def test_server_runs_unprivileged_with_a_gpu_and_a_read_only_repository() -> None:
    (deployment, _) = documents(K8S / "server.yaml")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/models")
    assert mount["readOnly"] is True


def test_images_and_commands_match_the_compose_file() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    images = {s["image"] for s in compose.values() if "image" in s}
    used = {c["image"] for _, d in manifests() for c in containers(d)}
    assert used <= images, used - images
    (job,) = documents(K8S / "trainer-job.yaml")
    (trainer,) = containers(job)
    assert trainer["command"] == compose["trainer"]["command"]
    assert (ROOT / trainer["command"][-1]).is_file()
    workers = [d for _, d in manifests() if d["metadata"]["name"] == "cnnserve-locust-worker"]
    assert containers(workers[0])[0]["args"][:2] == ["--worker", "--master-host"]
