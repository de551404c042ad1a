"""Where sessions run and how they are fed: placement, provider truth, FP16, IOBinding.

A GPU cannot run here, so CUDA is asked of the real onnxruntime-gpu build on a host
without a driver: its own fallback to the CPU is what these tests meet."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client import CollectorRegistry

from contract.repository import FP16_MODEL_FILE, MODEL_FILE, serving_config
from service.engine import threads as threads_module
from service.engine.models import load_model
from service.engine.options import EngineOptions
from service.engine.runtime import (
    CPU,
    CPU_ONLY,
    CUDA,
    BoundRuns,
    DeviceError,
    ModelRunner,
    Placement,
    cuda_provider_options,
    cuda_unusable_reason,
    decide_placement,
    nodes_not_on,
    place,
)
from service.engine.threads import ThreadTrial
from service.memory.cuda import DeviceTensor
from service.observability.metrics import Metrics

UNUSABLE = cuda_unusable_reason()
no_gpu = pytest.mark.skipif(not UNUSABLE, reason="CUDA runs here: test_cuda.py covers it")


@pytest.mark.parametrize(("device", "worker", "gpus", "unusable", "expected"), [
    ("cpu", 0, 2, "", CPU_ONLY),
    ("auto", 0, 0, "no driver", CPU_ONLY),
    ("auto", 0, 2, "", Placement(cuda=True, device_id=0)),
    ("auto", 3, 2, "", Placement(cuda=True, device_id=1)),
    ("cuda", 2, 2, "", Placement(cuda=True, device_id=0, strict=True)),
    ("cuda", 5, 4, "", Placement(cuda=True, device_id=1, strict=True)),
    ("cuda:1", 0, 2, "", Placement(cuda=True, device_id=1, strict=True)),
    ("cuda:1", 3, 2, "", Placement(cuda=True, device_id=1, strict=True)),
])
def test_placement_follows_the_device_and_spreads_workers_over_the_gpus(
        device: str, worker: int, gpus: int, unusable: str, expected: Placement) -> None:
    assert decide_placement(device, worker, gpus, unusable) == expected


@pytest.mark.parametrize(("device", "gpus", "unusable", "message"), [
    ("cuda", 0, "no NVIDIA driver here", "--device cuda: no NVIDIA driver here"),
    ("cuda:0", 0, "no NVIDIA driver here", "--device cuda:0: no NVIDIA driver here"),
    ("cuda:2", 2, "", "sees 2 GPU"),
    ("gpu", 1, "", "must be auto, cpu, cuda or cuda:N; got 'gpu'"),
])
def test_cuda_that_cannot_be_had_is_a_device_error_saying_why(
        device: str, gpus: int, unusable: str, message: str) -> None:
    with pytest.raises(DeviceError, match=message):
        decide_placement(device, 0, gpus, unusable)


@no_gpu
def test_on_this_host_auto_warns_once_and_cuda_is_refused(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="service.engine.runtime"):
        assert place("auto") == CPU_ONLY
    assert [r.getMessage() for r in caplog.records] == [
        f"device auto: serving every model on the CPU, since {UNUSABLE}"]
    with pytest.raises(DeviceError, match="no NVIDIA driver|shows no GPU"):
        place("cuda")


def test_cuda_provider_options_leave_onnxruntimes_defaults_unless_set() -> None:
    assert cuda_provider_options(EngineOptions(), 1) == {
        "device_id": "1", "cudnn_conv_algo_search": "HEURISTIC",
        "arena_extend_strategy": "kSameAsRequested"}
    options = cuda_provider_options(EngineOptions(allow_tf32=False, gpu_mem_limit_mb=512,
                                                  arena_extend_strategy="kNextPowerOfTwo"), 0)
    assert options["use_tf32"] == "0"
    assert options["gpu_mem_limit"] == str(512 * 2**20)
    assert options["arena_extend_strategy"] == "kNextPowerOfTwo"


@no_gpu
def test_a_strict_cuda_session_that_onnxruntime_puts_on_the_cpu_is_refused(
        served_repo: Path) -> None:
    path = served_repo / "lenet" / "1" / MODEL_FILE
    config = serving_config(served_repo, "lenet", path)
    with pytest.raises(DeviceError, match=f"lenet/1/model.onnx: CUDA was asked for, "
                                          f"onnxruntime applied {CPU}"):
        ModelRunner(path, EngineOptions(), config, Placement(cuda=True, strict=True))


@no_gpu
def test_under_auto_a_session_onnxruntime_puts_on_the_cpu_serves_and_says_so(
        served_repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = served_repo / "lenet" / "1" / MODEL_FILE
    with caplog.at_level(logging.WARNING, logger="service.engine.runtime"):
        runner = ModelRunner(path, EngineOptions(), serving_config(served_repo, "lenet", path),
                             Placement(cuda=True))
    assert (runner.provider, runner.on_gpu, runner.device_id) == (CPU, False, None)
    assert any("onnxruntime applied CPUExecutionProvider" in r.getMessage()
               for r in caplog.records)


def _load(repo: Path, placement: Placement, precision: Literal["fp32", "fp16"] = "fp32"
          ) -> tuple[str, str, str]:
    served = load_model(EngineOptions(repo=repo, warmup=False, precision=precision), "lenet",
                        None, Metrics(CollectorRegistry()), placement)  # type: ignore[arg-type]
    return served.file, served.provider, served.reason


@no_gpu
def test_fp16_follows_the_provider_onnxruntime_applied(served_repo: Path) -> None:
    assert (served_repo / "lenet" / "1" / FP16_MODEL_FILE).is_file()
    assert _load(served_repo, Placement(cuda=True), precision="fp16") == (MODEL_FILE, CPU, "")
    assert _load(served_repo, CPU_ONLY, precision="fp16") == (MODEL_FILE, CPU, "")
    assert _load(served_repo, CPU_ONLY) == (MODEL_FILE, CPU, "")


def test_fp16_without_an_fp16_file_is_refused_clearly(served_repo: Path,
                                                      tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(served_repo / "lenet", repo / "lenet")
    (repo / "lenet" / "1" / FP16_MODEL_FILE).unlink()
    file, provider, reason = _load(repo, CPU_ONLY, precision="fp16")
    assert provider == ""
    assert f"precision fp16 serves {FP16_MODEL_FILE}, which" in reason
    assert "export it with --fp16" in reason
    assert _load(repo, CPU_ONLY, precision="fp32")[2] == ""


@pytest.fixture
def alexnet(served_repo: Path) -> tuple[ort.InferenceSession, list[str]]:
    path = served_repo / "alexnet" / "1" / MODEL_FILE
    session = ort.InferenceSession(str(path), providers=[CPU])
    return session, [o.name for o in session.get_outputs()]


def test_iobinding_answers_as_plain_run_at_every_batch_size(
        alexnet: tuple[ort.InferenceSession, list[str]]) -> None:
    session, outputs = alexnet
    bound = BoundRuns(session, outputs, "cpu")
    rng = np.random.default_rng(3)
    for rows in range(1, 33):
        x = rng.standard_normal((rows, 1, 64, 64)).astype(np.float32)
        x.flags.writeable = False
        np.testing.assert_array_equal(bound.run({"input": x})[0],
                                      session.run(outputs, {"input": x})[0])
    wide = rng.standard_normal((5, 1, 64, 128)).astype(np.float32)
    strided = wide[:, :, :, ::2]  # not contiguous
    assert not strided.flags.c_contiguous
    np.testing.assert_array_equal(bound.run({"input": strided})[0],
                                  session.run(outputs, {"input": np.ascontiguousarray(strided)})[0])


def test_iobinding_answers_survive_the_next_batch_of_the_same_size(
        alexnet: tuple[ort.InferenceSession, list[str]]) -> None:
    """Outputs are written into one buffer per batch size; an answer handed out must not
    be that buffer."""
    session, outputs = alexnet
    bound = BoundRuns(session, outputs, "cpu")
    rng = np.random.default_rng(4)
    first_x, second_x = rng.standard_normal((2, 4, 1, 64, 64)).astype(np.float32)
    first = bound.run({"input": first_x})[0]
    kept = first.copy()
    second = bound.run({"input": second_x})[0]
    np.testing.assert_array_equal(first, kept)
    assert not np.array_equal(first, second)


def test_a_profile_names_the_nodes_off_the_preferred_provider(served_repo: Path,
                                                              tmp_path: Path) -> None:
    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp_path / "profile")
    session = ort.InferenceSession(str(served_repo / "lenet" / "1" / MODEL_FILE), opts,
                                   providers=[CPU])
    session.run(None, {"input": np.zeros((1, 1, 28, 28), np.float32)})
    profile = json.loads(Path(session.end_profiling()).read_text())
    off = nodes_not_on(profile, CUDA)
    assert off["Conv"] == 2 and sum(off.values()) >= 5
    assert not nodes_not_on(profile, CPU)


def test_a_device_tensor_is_bound_where_it_lies_and_copied_only_elsewhere(
        alexnet: tuple[ort.InferenceSession, list[str]]) -> None:
    """A client's tensor in (here host-backed) device memory: a session on that device
    reads it in place; one on another device gets a host copy, made once."""
    session, outputs = alexnet
    x = np.random.default_rng(6).standard_normal((3, 1, 64, 64)).astype(np.float32)
    copies = []

    def to_host() -> np.ndarray:
        copies.append(1)
        return x.copy()

    here = DeviceTensor(x.ctypes.data, 0, x.dtype, x.shape, to_host, device="cpu")
    expected = session.run(outputs, {"input": x})[0]
    np.testing.assert_array_equal(BoundRuns(session, outputs, "cpu").run({"input": here})[0],
                                  expected)
    assert copies == []
    elsewhere = DeviceTensor(x.ctypes.data, 1, x.dtype, x.shape, to_host, device="cpu")
    np.testing.assert_array_equal(BoundRuns(session, outputs, "cpu").run(
        {"input": elsewhere})[0], expected)
    np.testing.assert_array_equal(np.concatenate([elsewhere, elsewhere])[:3], x)
    assert copies == [1]



@pytest.mark.parametrize(("threads", "pool_speedup", "kept"), [(0, 1.1, 1), (0, 2.0, 0),
                                                               (2, 1.1, 2)])
def test_the_warm_up_fits_a_small_models_threads_only_where_they_are_left_to_it(
        served_repo: Path, monkeypatch: pytest.MonkeyPatch, threads: int,
        pool_speedup: float, kept: int) -> None:
    def timed(session: ort.InferenceSession, rows: int, runs: int) -> float:
        one_thread = session.get_session_options().intra_op_num_threads == 1
        return 1e-5 * rows * (pool_speedup if one_thread else 1.0)
    monkeypatch.setattr(threads_module, "run_s", timed)  # the host's speed is no premise
    path = served_repo / "lenet" / "1" / MODEL_FILE
    config = serving_config(served_repo, "lenet", path)
    runner = ModelRunner(path, EngineOptions(intra_op_threads=threads), config)
    x = {config.inputs[0].name: np.random.default_rng(0).standard_normal(
        (3, *config.inputs[0].shape)).astype(np.float32)}
    before = runner.run(x)
    assert sorted(runner.warmup([1, 2])) == [1, 2]
    assert runner.session.get_session_options().intra_op_num_threads == kept
    if threads:
        assert runner.thread_trial is None
    else:
        assert runner.thread_trial == ThreadTrial(8e-5, 8e-5 * pool_speedup)
        assert str(runner.thread_trial) in runner.intra_op_summary
    np.testing.assert_allclose(runner.run(x)[0], before[0], rtol=1e-5, atol=1e-6)
