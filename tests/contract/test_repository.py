import subprocess
import sys
from pathlib import Path

import pytest

from contract.repository import (
    CONFIG_FILE,
    MODEL_FILE,
    RepositoryError,
    check_model_name,
    list_versions,
    publish_version,
    read_onnx_metadata,
    serving_config,
)


@pytest.mark.parametrize("name", ["../etc", "a/b", "", "Model", ".hidden", "a" * 65, "x\x00",
                                  "名前", "/abs"])
def test_names_that_could_leave_the_repository_are_refused(name: str) -> None:
    with pytest.raises(RepositoryError, match="invalid model name"):
        check_model_name(name)


def test_versions_are_numbered_and_never_overwritten(tmp_path: Path) -> None:
    assert publish_version(tmp_path, "m", {MODEL_FILE: b"one"}) == 1
    assert publish_version(tmp_path, "m", {MODEL_FILE: b"two"}) == 2
    assert publish_version(tmp_path, "m", {MODEL_FILE: b"ten"}, version=10) == 10
    with pytest.raises(RepositoryError, match="m version 2 already exists"):
        publish_version(tmp_path, "m", {MODEL_FILE: b"again"}, version=2)
    assert (tmp_path / "m" / "2" / MODEL_FILE).read_bytes() == b"two"
    assert list_versions(tmp_path, "m") == [1, 2, 10]


def test_half_written_versions_are_never_listed(tmp_path: Path) -> None:
    publish_version(tmp_path, "m", {MODEL_FILE: b"one"})
    staging = tmp_path / "m" / ".staging-2-abc"  # what a crashed publish leaves behind
    staging.mkdir()
    (staging / MODEL_FILE).write_bytes(b"half")
    (tmp_path / "m" / "3").mkdir()  # a version folder whose model file never arrived
    assert list_versions(tmp_path, "m") == [1]


def test_a_failed_publish_leaves_no_version_and_no_staging(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        publish_version(tmp_path, "m", {MODEL_FILE: b"ok", "extra.bin": tmp_path / "missing"})
    assert list(p.name for p in (tmp_path / "m").iterdir()) == []


def test_foreign_and_damaged_onnx_files_are_explained(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(tmp_path / "plain.onnx"))
    with pytest.raises(RepositoryError, match="no 'cnnserve.metadata' metadata"):
        read_onnx_metadata(tmp_path / "plain.onnx")
    (tmp_path / "broken.onnx").write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(RepositoryError, match="not a readable ONNX model"):
        read_onnx_metadata(tmp_path / "broken.onnx")


def test_metadata_loader_never_imports_torch(trained_run: Path, tmp_path: Path) -> None:
    from export.pipeline import export_checkpoint

    export_checkpoint(trained_run / "lenet" / "checkpoint.pt", tmp_path)
    code = ("import sys; from pathlib import Path; "
            "from contract.repository import read_onnx_metadata, list_models, read_config; "
            f"repo = Path({str(tmp_path)!r}); "
            "meta = read_onnx_metadata(repo / 'lenet' / '1' / 'model.onnx'); "
            "assert list_models(repo) == ['lenet'] and read_config(repo, 'lenet'); "
            "print(meta.model.name, meta.model.preprocessing.mean, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2]).stdout.split()
    assert out[0] == "lenet" and out[-1] == "False"


def test_a_plain_onnx_models_config_comes_from_its_graph_and_config_json(tmp_path: Path) -> None:
    import json

    import onnx
    from onnx import TensorProto, helper

    def save(first: int | str) -> Path:
        graph = helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.INT8, [first, "w", 3])],
            [helper.make_tensor_value_info("y", TensorProto.INT8, [first, "w", 3])])
        path = tmp_path / "m" / "1" / MODEL_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(helper.make_model(graph), str(path))
        return path

    dynamic = save("n")
    config = serving_config(tmp_path, "m", dynamic)
    assert (config.max_batch_size, config.inputs[0].shape, config.inputs[0].datatype) == (
        32, (-1, 3), "INT8")
    (tmp_path / "m" / CONFIG_FILE).write_text(json.dumps({"max_batch_size": 0}))
    config = serving_config(tmp_path, "m", dynamic)
    assert (config.max_batch_size, config.inputs[0].shape, config.preferred_batch_sizes) == (
        0, (-1, -1, 3), ())
    fixed = save(1)
    (tmp_path / "m" / CONFIG_FILE).write_text(json.dumps({"max_batch_size": 4}))
    with pytest.raises(RepositoryError, match="-1 first is the batch dimension"):
        serving_config(tmp_path, "m", fixed)
    (tmp_path / "m" / CONFIG_FILE).unlink()
    assert serving_config(tmp_path, "m", fixed).max_batch_size == 0
