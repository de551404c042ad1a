"""The intra-op thread choice: the rule on given timings (never this host's speed), on
real onnxruntime sessions of small made-up models."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.engine.threads import (
    POOL_GAIN,
    SMALL_MODEL_S,
    TRIAL_ROWS,
    ThreadTrial,
    fitted_session,
    run_s,
)


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what this onnxruntime reads
    onnx.save(model, str(path))
    return path


def _matmuls(path: Path, width: int = 16, layers: int = 2, batch: str | int = "N") -> Path:
    """x (batch, width) through `layers` MatMuls by one width x width matrix."""
    weight = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((width, width)).astype(np.float32) / width,
        "w")
    names = ["x", *[f"h{i}" for i in range(1, layers)], "y"]
    nodes = [helper.make_node("MatMul", [a, "w"], [b])
             for a, b in zip(names[:-1], names[1:], strict=True)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, width])], [weight])
    return _save(graph, path)


def _session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _threads(session: ort.InferenceSession) -> int:
    return int(session.get_session_options().intra_op_num_threads)


def _timer(seconds: Callable[[int, int], float]) -> tuple[list[tuple[int, int]],
                                                           Callable[..., float]]:
    """A timer that answers `seconds(threads, rows)` for a session, noting each
    (threads, rows) it was asked."""
    asked: list[tuple[int, int]] = []

    def timer(session: ort.InferenceSession, rows: int, runs: int) -> float:
        asked.append((_threads(session), rows))
        return seconds(_threads(session), rows)
    return asked, timer


def test_the_pool_is_kept_only_where_it_runs_the_batch_pool_gain_times_as_fast() -> None:
    assert not ThreadTrial(pooled_s=1.0e-4, single_s=1.1e-4).keeps_pool
    assert not ThreadTrial(pooled_s=1.0e-4, single_s=POOL_GAIN * 0.99e-4).keeps_pool
    assert ThreadTrial(pooled_s=1.0e-4, single_s=POOL_GAIN * 1.0e-4).keeps_pool
    assert ThreadTrial(pooled_s=1.0e-4, single_s=3.0e-4).keeps_pool


def test_a_small_model_the_pool_does_not_speed_up_runs_on_one_thread(tmp_path: Path) -> None:
    path = _matmuls(tmp_path / "m.onnx")
    pooled = _session(path, 0)
    asked, timer = _timer(lambda threads, rows: 1e-5 * rows * (1.0 if threads == 1 else 0.9))
    chosen, trial = fitted_session(pooled, lambda: _session(path, 1), timer)
    assert asked == [(0, 1), (0, TRIAL_ROWS), (1, TRIAL_ROWS)]
    assert trial == ThreadTrial(pooled_s=0.9 * 8e-5, single_s=8e-5)
    assert _threads(chosen) == 1
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    np.testing.assert_allclose(chosen.run(None, {"x": x})[0], pooled.run(None, {"x": x})[0],
                               rtol=1e-5)


def test_a_small_model_the_pool_runs_much_faster_keeps_it(tmp_path: Path) -> None:
    path = _matmuls(tmp_path / "m.onnx")
    pooled = _session(path, 0)
    _, timer = _timer(lambda threads, rows: 1e-4 * rows * (2.0 if threads == 1 else 1.0))
    chosen, trial = fitted_session(pooled, lambda: _session(path, 1), timer)
    assert chosen is pooled
    assert trial is not None and trial.keeps_pool


def test_a_model_too_large_for_one_thread_keeps_the_pool_without_a_trial(
        tmp_path: Path) -> None:
    path = _matmuls(tmp_path / "m.onnx")
    pooled = _session(path, 0)
    made: list[int] = []
    asked, timer = _timer(lambda threads, rows: SMALL_MODEL_S)

    def single() -> ort.InferenceSession:
        made.append(1)
        return _session(path, 1)
    chosen, trial = fitted_session(pooled, single, timer)
    assert (chosen, trial, made, asked) == (pooled, None, [], [(0, 1)])


def test_a_model_whose_input_cannot_be_made_up_keeps_the_pool(tmp_path: Path) -> None:
    # A dimension past the first of any size: no image of zeros stands for a request.
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "D"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "D"])])
    pooled = _session(_save(graph, tmp_path / "any.onnx"), 0)
    assert run_s(pooled, 1, 3) is None
    assert fitted_session(pooled, lambda: pytest.fail("no trial expected")) == (pooled, None)


def test_real_timings_decide_by_the_rule(tmp_path: Path) -> None:
    """With this host's own timings, whichever way they fall, the session kept is the
    one the trial's figures call for."""
    path = _matmuls(tmp_path / "m.onnx")
    pooled = _session(path, 0)
    chosen, trial = fitted_session(pooled, lambda: _session(path, 1))
    if trial is None:  # a host on which even this runs past SMALL_MODEL_S
        assert chosen is pooled
    else:
        assert _threads(chosen) == (0 if trial.keeps_pool else 1)
        assert trial.pooled_s > 0 and trial.single_s > 0


def test_a_fixed_first_dimension_is_run_as_given(tmp_path: Path) -> None:
    session = _session(_matmuls(tmp_path / "m.onnx", 16, 1, batch=4), 1)
    assert run_s(session, 8, 2) is not None  # run on 4 rows, not 8: no shape error
