import subprocess
import sys
from pathlib import Path

import pytest

from contract.repository import (
    MODEL_FILE,
    RepositoryError,
    check_model_name,
    list_versions,
    publish_version,
    read_onnx_metadata,
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
