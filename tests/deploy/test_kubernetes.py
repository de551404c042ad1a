"""Kubernetes manifests and the KServe runtime and predictors: valid against Kubernetes' and
KServe's published schemas, and consistent with the code."""

from __future__ import annotations

import copy
import functools
import gzip
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from service.app.settings import ServiceSettings
from tests.servers import ROOT

K8S = ROOT / "deploy" / "kubernetes"
SCHEMAS = Path(__file__).parent / "schemas"
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
    if doc["kind"] in ("Deployment", "Job"):
        return list(spec["template"]["spec"]["containers"])
    return []


def test_kustomization_lists_every_manifest() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


@pytest.mark.parametrize(("name", "doc"), manifests(), ids=[n for n, _ in manifests()])
def test_manifest_is_valid_against_the_kubernetes_schema(name: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, VERSION, strict=True)


def kserve_documents() -> list[dict[str, Any]]:
    return [d for path in sorted((K8S / "kserve").glob("*.yaml")) for d in documents(path)]


def strict(schema: Any) -> Any:
    """KServe's CRD schema as `kubectl --validate=strict` applies it: unknown fields are
    errors (the API server would silently prune them)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    return [strict(v) for v in schema] if isinstance(schema, list) else schema


@functools.cache
def kserve_validator(kind: str) -> jsonschema.Draft7Validator:
    """KServe's published CRD schema for `kind` (tests/deploy/schemas names its source)."""
    with gzip.open(SCHEMAS / f"kserve-{kind.lower()}.json.gz") as f:
        published = json.load(f)
    return jsonschema.Draft7Validator(strict(published["schema"]))


def kserve_errors(doc: dict[str, Any]) -> list[str]:
    found = kserve_validator(doc["kind"]).iter_errors(doc)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in found]


def serving_containers(doc: dict[str, Any], runtimes: dict[str, dict[str, Any]]
                       ) -> list[dict[str, Any]]:
    """The predictor's containers as KServe builds them: a custom predictor's own, or the
    runtime's container with the model's container fields laid over it."""
    predictor = doc["spec"]["predictor"]
    if "containers" in predictor:
        return list(predictor["containers"])
    model = predictor["model"]
    (container,) = runtimes[model["runtime"]]["spec"]["containers"]
    overrides = {k: v for k, v in model.items()
                 if k not in ("modelFormat", "runtime", "protocolVersion", "storageUri")}
    return [{**container, **overrides}]


@pytest.mark.parametrize("doc", kserve_documents(),
                         ids=[f"{d['kind']}:{d['metadata']['name']}" for d in kserve_documents()])
def test_kserve_manifests_are_valid_against_kserves_crd_schemas(doc: dict[str, Any]) -> None:
    assert kserve_errors(doc) == []


def test_the_kserve_schema_check_rejects_misspelt_and_mistyped_fields() -> None:
    (runtime,) = [d for d in kserve_documents() if d["kind"] == "ServingRuntime"]
    misspelt = copy.deepcopy(runtime)
    misspelt["spec"]["protocolVersion"] = ["v2"]
    mistyped = copy.deepcopy(runtime)
    mistyped["spec"]["containers"][0]["ports"][0]["containerPort"] = "8080"
    assert any("protocolVersion" in e for e in kserve_errors(misspelt))
    assert any("containerPort" in e for e in kserve_errors(mistyped))


def test_kserve_predictors_serve_v2_on_the_port_they_declare_and_expose_metrics() -> None:
    docs = kserve_documents()
    runtimes = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServingRuntime"}
    services = [d for d in docs if d["kind"] == "InferenceService"]
    assert {d["metadata"]["name"] for d in services} >= {"cnnserve", "cnnserve-grpc"}
    for runtime in runtimes.values():
        assert {"name": "onnx", "version": "1", "autoSelect": True, "priority": 2} in \
            runtime["spec"]["supportedModelFormats"]
    for service in services:
        predictor = service["spec"]["predictor"]
        (container,) = serving_containers(service, runtimes)
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"},
               "spec": {"containers": [container]}}
        kubernetes_validate.validate(pod, VERSION, strict=True)
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["CNNSERVE_REPO"] == "/mnt/models"  # where KServe puts the storageUri
        assert set(env) - {"STORAGE_URI", "PROTOCOL"} <= SETTINGS
        if "model" in predictor:
            runtime = runtimes[predictor["model"]["runtime"]]
            protocol = predictor["model"]["protocolVersion"]
            assert protocol in runtime["spec"]["protocolVersions"]
            annotations = runtime["spec"]["annotations"]
        else:  # a custom predictor says its protocol in PROTOCOL (KServe assumes v1)
            protocol = "grpc-v2" if container["ports"][0]["name"] == "h2c" else env["PROTOCOL"]
            assert env["PROTOCOL"] == "v2"
            annotations = predictor["annotations"]
        (port,) = container["ports"]  # Knative forwards one port
        if protocol == "grpc-v2":
            assert port == {"name": "h2c", "containerPort": int(env["CNNSERVE_PORT"]),
                            "protocol": "TCP"}
            assert container["readinessProbe"]["grpc"]["port"] == port["containerPort"]
        else:
            assert protocol == "v2"
            assert port["containerPort"] == int(env["CNNSERVE_HTTP_PORT"])
            assert container["readinessProbe"]["httpGet"] == {
                "path": "/v2/health/ready", "port": port["containerPort"]}
        annotated = service["metadata"]["annotations"]
        assert annotated["serving.kserve.io/enable-prometheus-scraping"] == "true"
        assert annotations["prometheus.kserve.io/port"] == env["CNNSERVE_METRICS_PORT"]
        assert annotations["prometheus.kserve.io/path"] == "/metrics"


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
