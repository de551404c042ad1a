"""The REST surface against its own OpenAPI document (service/frontends/openapi.json),
driven by schemathesis against a real server: no 5xx, every status and body as the document
says, and nothing a client sends makes the server log a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.frontends.http_inference import OPENAPI
from tests.conftest import TINY_CONFIGS
from tests.servers import ServerProcess, start_server

MODELS = [*TINY_CONFIGS, "no_such_model"]
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_headers_conformance,response_schema_conformance")


@pytest.fixture(scope="module")
def rest_server(served_repo: Path) -> Iterator[ServerProcess]:
    """A server of this module's own, so that its log holds only what schemathesis sent."""
    server = start_server(served_repo)
    yield server
    assert server.terminate() == 0, "".join(server.lines)


def document() -> dict[str, Any]:
    """The published document, with model names drawn from the served ones and one
    unknown, and deadlines a request can meet; load and unload only ever name the unknown
    one, so that the run does not take the models it drives out of service."""
    doc: dict[str, Any] = json.loads(OPENAPI.read_bytes())
    doc["components"]["parameters"]["name"]["schema"] = {"type": "string", "enum": MODELS}
    # A deadline of 1e-300 s passes before any answer: 504 is then the right status, so
    # the run sends deadlines a request can meet.
    doc["components"]["parameters"]["timeout"]["schema"] = {"type": "number", "minimum": 5}
    for path in ("/v2/repository/models/{name}/load", "/v2/repository/models/{name}/unload"):
        doc["paths"][path]["parameters"] = [{"name": "name", "in": "path", "required": True,
                                             "schema": {"type": "string",
                                                        "enum": ["no_such_model"]}}]
    return doc


def test_the_document_is_served_as_kept(rest_server: ServerProcess) -> None:
    url = f"http://127.0.0.1:{rest_server.http_port}/openapi.json"
    with urllib.request.urlopen(url, timeout=10) as answer:
        served = json.loads(answer.read())
    assert served == json.loads(OPENAPI.read_bytes())
    assert served["openapi"].startswith("3.")
    assert {"/v2/", "/v2/models/{name}/versions/{version}/infer",
            "/v2/models/{name}/classify"} <= set(served["paths"])


def test_every_route_answers_as_its_document_says(rest_server: ServerProcess,
                                                  tmp_path: Path) -> None:
    """schemathesis's own runner (valid and invalid data, each operation's coverage
    cases), with a fixed seed so that a failure reproduces."""
    spec = tmp_path / "openapi.json"
    spec.write_text(json.dumps(document()))
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", str(spec),
         "--url", f"http://127.0.0.1:{rest_server.http_port}", "--checks", CHECKS,
         "--phases", "examples,coverage,fuzzing", "--max-examples", "20", "--seed", "1",
         "--workers", "1", "--request-timeout", "30", "--generation-database", "none",
         "--suppress-health-check", "all", "--no-color",
         "--report-dir", str(tmp_path / "report")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]


def test_nothing_sent_made_the_server_log_a_traceback(rest_server: ServerProcess) -> None:
    """Runs after the generated cases (pytest keeps a module's order)."""
    log = "".join(rest_server.lines)
    assert "Traceback" not in log, log[-4000:]
