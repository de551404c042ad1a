"""Logging a client cannot flood."""

from __future__ import annotations

import logging

import pytest

from service.observability.logs import ClientsGone


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
