"""The Grafana dashboard: valid against Grafana's schema (grafana-foundation-sdk's typed
models), importable into any Grafana whatever its Prometheus data source is called, and
built on metrics the server exports. Grafana itself cannot run here; the expressions are
evaluated by a real Prometheus in tests/service/observability/test_prometheus.py."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import Dashboard
from prometheus_client import CollectorRegistry

from service.observability.metrics import Metrics
from tests.servers import ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "cnnserve.json"
GPU_METRICS = {"cnnserve_gpu_utilization_ratio", "cnnserve_gpu_memory_used_bytes",
               "cnnserve_gpu_memory_total_bytes", "cnnserve_gpu_power_watts"}


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def expressions(doc: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in all_panels(doc["panels"]) for t in p.get("targets", [])]


def paths(value: Any, prefix: str = "") -> set[str]:
    """Every key path in a JSON document (list items share their list's path)."""
    if isinstance(value, dict):
        return {f"{prefix}.{k}" for k in value} | {
            p for k, v in value.items() for p in paths(v, f"{prefix}.{k}")}
    if isinstance(value, list):
        return {p for v in value for p in paths(v, prefix + "[]")}
    return set()


def test_every_field_is_one_of_grafanas_dashboard_schema() -> None:
    doc = dashboard()
    model = Dashboard.from_json(doc)  # fields Grafana's schema lacks are dropped here
    kept = json.loads(JSONEncoder().encode(model))
    # __inputs and __requires are the export format's, read by Grafana's import.
    written = paths({k: v for k, v in doc.items() if not k.startswith("__")})
    assert written - paths(kept) == set()


def test_it_imports_into_a_grafana_whose_prometheus_has_any_name() -> None:
    doc = dashboard()
    assert doc["__inputs"] == [{"name": "DS_PROMETHEUS", "label": "Prometheus",
                                "description": "", "type": "datasource",
                                "pluginId": "prometheus", "pluginName": "Prometheus"}]
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    source = variables["datasource"]
    assert (source["type"], source["query"]) == ("datasource", "prometheus")
    assert source["current"]["value"] == "${DS_PROMETHEUS}"  # the data source chosen on import
    for panel in all_panels(doc["panels"]):
        for holder in [panel, *panel.get("targets", [])]:
            if panel["type"] != "row":
                assert holder["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert '"uid": "prometheus"' not in DASHBOARD.read_text()


def test_it_filters_by_model_version_and_instance_and_rates_over_the_rate_interval() -> None:
    doc = dashboard()
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    for name in ("model", "version", "instance"):
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
    for expr in expressions(doc):
        assert 'instance=~"$instance"' in expr, expr
        assert not re.search(r"\[\d+[smh]\]", expr), expr
        if "rate(" in expr or "increase(" in expr:
            assert "[$__rate_interval]" in expr, expr
        if re.search(r"cnnserve_(request_latency|queue_wait|compute|batch_size|inferences)", expr):
            assert 'version=~"$version"' in expr and 'model=~"$model"' in expr, expr


def test_it_has_the_panels_a_platform_team_reads_and_gpu_panels_fold_away() -> None:
    doc = dashboard()
    text = " ".join(expressions(doc))
    for needed in ('code!="OK"', "by (api)", "cnnserve_queue_wait_seconds_bucket",
                   "cnnserve_compute_seconds_bucket", "cnnserve_batch_size_bucket",
                   "cnnserve_in_flight_calls", "cnnserve_executions_total",
                   "cnnserve_build_info"):
        assert needed in text, needed
    (row,) = [p for p in doc["panels"] if p["type"] == "row"]
    assert row["collapsed"] and {m for p in row["panels"] for m in re.findall(
        r"cnnserve_gpu_\w+", p["targets"][0]["expr"])} == GPU_METRICS


def test_every_metric_it_reads_is_exported() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"],
                "gauge": [""], "info": ["_info"]}
    exported = {m.name + s for m in registry.collect() for s in suffixes[m.type]}
    used = set(re.findall(r"cnnserve_[a-z_]+", " ".join(expressions(dashboard()))))
    assert used - GPU_METRICS <= exported, used - exported
