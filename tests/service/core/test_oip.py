"""The Open Inference Protocol's request checks on the core's own types, in-process: what
both bindings (gRPC and REST) rely on, without a server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from contract.repository import ModelConfig, TensorSpec
from service.core.oip import InputTensor, OipRequest, RequestedOutput, checked_inputs
from service.engine.batching import BatchPolicy
from service.engine.models import ServedModel
from service.memory.cuda import CudaSharedMemoryRegistry
from service.memory.regions import Regions
from service.memory.system import SharedMemoryRegistry
from service.status import ServingError, Status

POLICY = BatchPolicy(max_batch_size=8, rule="budget", budget_s=None, max_queue_delay_s=0.0,
                     preferred_batch_sizes=frozenset(), max_queue_size=8, instances=1)


def model(*inputs: TensorSpec) -> ServedModel:
    config = ModelConfig(name="m", inputs=inputs or (TensorSpec(name="x", shape=(2,)),),
                         outputs=(TensorSpec(name="y", shape=(3,)),
                                  TensorSpec(name="z", shape=(1,))))
    return ServedModel("m", 1, config, POLICY)


@pytest.fixture
def shm(tmp_path: Path) -> Iterator[Regions]:
    regions = Regions(SharedMemoryRegistry(tmp_path), CudaSharedMemoryRegistry())
    yield regions
    regions.close()


def refusal(request: OipRequest, shm: Regions, served: ServedModel | None = None) -> str:
    with pytest.raises(ServingError) as err:
        checked_inputs(request, shm, served or model())
    assert err.value.status in (Status.INVALID_ARGUMENT, Status.NOT_FOUND)
    return str(err.value)


def x(shape: tuple[int, ...] = (1, 2), datatype: str = "FP32", **fields: object
      ) -> InputTensor:
    return InputTensor("x", datatype, shape, **fields)  # type: ignore[arg-type]


def test_raw_bytes_become_the_models_input_in_place(shm: Regions) -> None:
    data = np.arange(4, dtype="<f4").reshape(2, 2)
    tensors = checked_inputs(OipRequest("m", inputs=[x((2, 2))], raw=[data.tobytes()]), shm,
                             model())
    np.testing.assert_array_equal(tensors["x"], data)


def test_typed_contents_are_read_from_the_datatypes_own_field(shm: Regions) -> None:
    ints = model(TensorSpec(name="x", datatype="INT8", shape=(2,)))
    request = OipRequest("m", inputs=[InputTensor("x", "INT8", (1, 2),
                                                  contents={"int_contents": [-128, 127]})])
    assert np.asarray(checked_inputs(request, shm, ints)["x"]).tolist() == [[-128, 127]]
    too_big = OipRequest("m", inputs=[InputTensor("x", "INT8", (1, 2),
                                                  contents={"int_contents": [0, 128]})])
    assert "values must lie in -128..127" in refusal(too_big, shm, ints)
    wrong = OipRequest("m", inputs=[InputTensor("x", "INT8", (1, 2),
                                                contents={"fp32_contents": [0.0, 1.0]})])
    assert "goes in contents.int_contents, got ['fp32_contents']" in refusal(wrong, shm, ints)


@pytest.mark.parametrize(("request_", "message"), [
    (OipRequest("m", inputs=[InputTensor("w", "FP32", (1, 2))]), "takes inputs ['x']"),
    (OipRequest("m", inputs=[x(datatype="FP16")], raw=[b"\0" * 4]),
     "must have datatype FP32"),
    (OipRequest("m", inputs=[x((1, 3))], raw=[b"\0" * 12]), "must have shape [N, 2]"),
    (OipRequest("m", inputs=[x((0, 2))], raw=[b""]), "each dim >= 1"),
    (OipRequest("m", inputs=[x()], raw=[b"\0" * 7]), "needs 8 bytes of little-endian FP32"),
    (OipRequest("m", inputs=[x()], raw=[b"\0" * 8, b""]), "expected 1 raw_input_contents"),
    (OipRequest("m", inputs=[x()]), "carries no data"),
    (OipRequest("m", inputs=[x(contents={"fp32_contents": [1.0, 2.0]})], raw=[b"\0" * 8]),
     "send its data in one place"),
    (OipRequest("m", inputs=[x()], raw=[b"\0" * 8], outputs=[RequestedOutput("q")]),
     "has outputs ['y', 'z']; requested ['q']"),
    (OipRequest("m", inputs=[x()], raw=[b"\0" * 8],
                outputs=[RequestedOutput("y"), RequestedOutput("y")]), "requested ['y', 'y']"),
    (OipRequest("m", inputs=[x()], raw=[b"\0" * 8],
                outputs=[RequestedOutput("y", {"classification": 1})]),
     "classification extension is not supported"),
    (OipRequest("m", inputs=[x(parameters={"shared_memory_region": "r"})]),
     "without shared_memory_byte_size"),
    (OipRequest("m", inputs=[x(parameters={"shared_memory_region": "r",
                                           "shared_memory_byte_size": "8"})]),
     "integers, got string_param"),
    (OipRequest("m", inputs=[x(parameters={"shared_memory_region": "r",
                                           "shared_memory_byte_size": -1})]),
     "not negative, got -1"),
    (OipRequest("m", inputs=[x(parameters={"shared_memory_region": "absent",
                                           "shared_memory_byte_size": 8})]),
     "'absent'"),
])
def test_a_request_that_does_not_fit_the_model_is_refused_with_what_is_wrong(
        shm: Regions, request_: OipRequest, message: str) -> None:
    assert message in refusal(request_, shm)


def test_inputs_of_one_batch_share_its_first_dimension(shm: Regions) -> None:
    two = model(TensorSpec(name="a", shape=(1,)), TensorSpec(name="b", shape=(1,)))
    request = OipRequest("m", inputs=[InputTensor("b", "FP32", (2, 1)),
                                      InputTensor("a", "FP32", (3, 1))],
                         raw=[b"\0" * 8, b"\0" * 12])
    assert "must be the same, got [2, 3]" in refusal(request, shm, two)
    three = model(*(TensorSpec(name=n, shape=(1,)) for n in "abc"))
    scalar_last = OipRequest("m", inputs=[InputTensor("a", "FP32", (2, 1)),
                                          InputTensor("b", "FP32", (3, 1)),
                                          InputTensor("c", "FP32", ())],
                             raw=[b"\0" * 8, b"\0" * 12, b""])
    assert "must be the same, got [2, 3]" in refusal(scalar_last, shm, three)
    ordered = OipRequest("m", inputs=[InputTensor("b", "FP32", (1, 1)),
                                      InputTensor("a", "FP32", (1, 1))],
                         raw=[np.float32(2).tobytes(), np.float32(1).tobytes()])
    tensors = checked_inputs(ordered, shm, two)
    assert list(tensors) == ["a", "b"] and np.asarray(tensors["a"]).item() == 1.0


def test_an_input_in_shared_memory_is_read_from_its_window(tmp_path: Path, shm: Regions
                                                          ) -> None:
    data = np.array([[5.0, 6.0]], "<f4")
    (tmp_path / "obj").write_bytes(b"\0" * 4 + data.tobytes())
    shm.register_system("r", "obj", 0, 12)
    request = OipRequest("m", inputs=[x(parameters={
        "shared_memory_region": "r", "shared_memory_offset": 4,
        "shared_memory_byte_size": 8})])
    np.testing.assert_array_equal(checked_inputs(request, shm, model())["x"], data)
