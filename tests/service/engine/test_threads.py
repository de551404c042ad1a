"""The intra-op thread choice, on real onnxruntime sessions of small made-up models."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from service.engine.threads import SMALL_MODEL_S, cpu_sessions, run_s

Make = Callable[[int], ort.InferenceSession]


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what this onnxruntime reads
    onnx.save(model, str(path))
    return path


def _matmuls(path: Path, width: int, layers: int, batch: str | int = "N") -> Path:
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


def _maker(paths: dict[int, Path], made: list[int]) -> Make:
    """Builds the session for `threads` from `paths[threads]` (or `paths[-1]`), noting
    each thread count asked for in `made`."""
    def make(threads: int) -> ort.InferenceSession:
        made.append(threads)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        return ort.InferenceSession(str(paths[threads] if threads in paths else paths[-1]), opts,
                                    providers=["CPUExecutionProvider"])
    return make


def _threads(session: ort.InferenceSession) -> int:
    return int(session.get_session_options().intra_op_num_threads)


def test_a_tiny_model_runs_batches_on_one_thread_and_a_lone_caller_on_the_pool(
        tmp_path: Path) -> None:
    made: list[int] = []
    batches, lone = cpu_sessions(_maker({-1: _matmuls(tmp_path / "m.onnx", 16, 2)}, made), 0)
    assert made == [0, 1]
    assert (_threads(batches), _threads(lone)) == (1, 0)
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    np.testing.assert_allclose(batches.run(None, {"x": x})[0], lone.run(None, {"x": x})[0],
                               rtol=1e-5)


def test_the_pool_is_kept_where_it_runs_a_batch_much_faster_than_one_thread(
        tmp_path: Path) -> None:
    # The pool's session is a light model and the one thread's a heavy one with the same
    # inputs: the trial finds the pool far faster, as it finds it on the quick VGG.
    light = _matmuls(tmp_path / "light.onnx", 256, 1)
    heavy = _matmuls(tmp_path / "heavy.onnx", 256, 40)
    made: list[int] = []
    batches, lone = cpu_sessions(_maker({0: light, 1: heavy}, made), 0)
    assert made == [0, 1]
    assert batches is lone and _threads(batches) == 0


def test_a_model_too_large_for_one_thread_keeps_the_pool_without_a_trial(
        tmp_path: Path) -> None:
    path = _matmuls(tmp_path / "large.onnx", 2048, 8)
    pooled = _maker({-1: path}, [])(0)
    assert (run_s(pooled, 1) or 0.0) >= SMALL_MODEL_S  # the premise, on this host
    made: list[int] = []
    batches, lone = cpu_sessions(_maker({-1: path}, made), 0)
    assert made == [0]
    assert batches is lone


def test_a_thread_count_that_is_set_serves_batches_and_lone_callers_alike(
        tmp_path: Path) -> None:
    made: list[int] = []
    batches, lone = cpu_sessions(_maker({-1: _matmuls(tmp_path / "m.onnx", 16, 2)}, made), 2)
    assert made == [2]
    assert batches is lone and _threads(batches) == 2


def test_a_model_whose_input_cannot_be_made_up_keeps_the_pool(tmp_path: Path) -> None:
    # A dimension past the first of any size: no image of zeros stands for a request.
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "D"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "D"])])
    path = _save(graph, tmp_path / "any.onnx")
    made: list[int] = []
    batches, lone = cpu_sessions(_maker({-1: path}, made), 0)
    assert made == [0]
    assert batches is lone
    assert run_s(batches, 1) is None


def test_a_fixed_first_dimension_is_run_as_given(tmp_path: Path) -> None:
    session = _maker({-1: _matmuls(tmp_path / "m.onnx", 16, 1, batch=4)}, [])(1)
    assert run_s(session, 8) is not None  # run on 4 rows, not 8: no shape error
