"""Logging a client cannot flood."""

from __future__ import annotations

import logging

import pytest

from service.observability.logs import ClientsGone, MalformedHttp


def test_answers_to_clients_that_left_become_one_info_line_without_traceback(
        caplog: pytest.LogCaptureFixture) -> None:
    grpc_log = logging.getLogger("tests.grpc_cygrpc")  # stands for grpc._cython.cygrpc
    grpc_log.addFilter(ClientsGone(interval_s=60))
    caplog.set_level(logging.INFO)
    for _ in range(100):
        try:
            raise RuntimeError("Failed execute_batch")
        except RuntimeError:
            grpc_log.error("ExecuteBatchError raised in core by servicer method [%s]",
                           "/inference.GRPCInferenceService/ModelInfer", exc_info=True)
    grpc_log.error("a real fault")

    assert [(r.name, r.levelno, bool(r.exc_info)) for r in caplog.records] == [
        ("service.edge.grpc_edge", logging.INFO, False),
        ("tests.grpc_cygrpc", logging.ERROR, False)]
    assert "/inference.GRPCInferenceService/ModelInfer" in caplog.records[0].getMessage()


def test_requests_the_http_parser_refuses_become_one_info_line_without_traceback(
        caplog: pytest.LogCaptureFixture) -> None:
    from aiohttp.http_exceptions import BadHttpMessage

    aiohttp_log = logging.getLogger("tests.aiohttp_server")  # stands for aiohttp.server
    aiohttp_log.addFilter(MalformedHttp(interval_s=60))
    caplog.set_level(logging.INFO)
    for _ in range(100):
        aiohttp_log.exception("Error handling request from %s", "127.0.0.1",
                              exc_info=BadHttpMessage("Invalid header value char:\n\n  "
                                                      + "x" * 5000))
    aiohttp_log.exception("Error handling request", exc_info=RuntimeError("a real fault"))

    assert [(r.name, r.levelno, bool(r.exc_info)) for r in caplog.records] == [
        ("service.edge.http_edge", logging.INFO, False),
        ("tests.aiohttp_server", logging.ERROR, True)]
    first = caplog.records[0].getMessage()
    assert "Invalid header value char" in first and "\n" not in first and len(first) < 300
