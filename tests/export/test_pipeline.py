import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import export.pipeline
from contract.metadata import ONNX_METADATA_KEY
from contract.repository import (
    FP16_MODEL_FILE,
    MODEL_FILE,
    REPORT_FILE,
    RepositoryError,
    list_models,
    list_versions,
    read_config,
    read_onnx_metadata,
)
from export.cli import main
from export.onnx_export import export_onnx
from export.pipeline import ParityError, export_checkpoint
from tests.conftest import TINY_CONFIGS
from training.checkpoint import file_sha256, load_checkpoint


@pytest.fixture(scope="module")
def repo(served_repo: Path) -> Path:
    """Every tiny model exported with --fp16 (the shared session fixture)."""
    return served_repo


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_every_architecture_exports_with_parity_at_batch_1_7_32(repo: Path, name: str) -> None:
    report = json.loads((repo / name / "1" / REPORT_FILE).read_text())
    fp32, fp16 = report["variants"]
    assert [p["batch_size"] for p in fp32["parity"]] == [1, 7, 32]
    for figures in fp32["parity"]:
        assert figures["images"] == 500
        assert figures["max_abs_diff"] <= 1e-4
        assert figures["top1_agreement"] == 1.0
        assert figures["accuracy"] == pytest.approx(report["torch_test_accuracy"])
    assert all(p["top1_agreement"] >= 0.995 for p in fp16["parity"])
    assert set(fp32["latency_ms"]) == {"1", "32"}
    assert fp32["size_bytes"] == (repo / name / "1" / MODEL_FILE).stat().st_size


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_onnx_metadata_round_trips_the_checkpoint(repo: Path, trained_run: Path, name: str
                                                  ) -> None:
    checkpoint = trained_run / name / "checkpoint.pt"
    _, original = load_checkpoint(checkpoint)
    embedded = read_onnx_metadata(repo / name / "1" / MODEL_FILE)
    assert embedded.model == original
    assert embedded.export.source_sha256 == file_sha256(checkpoint)
    assert (embedded.export.input_name, embedded.export.output_name) == ("input", "logits")
    assert embedded.export.precision == "fp32"
    assert read_onnx_metadata(repo / name / "1" / FP16_MODEL_FILE).export.precision == "fp16"
    # onnxruntime sees the same metadata, so any ORT-based tool can read it.
    session = ort.InferenceSession(str(repo / name / "1" / MODEL_FILE),
                                   providers=["CPUExecutionProvider"])
    assert ONNX_METADATA_KEY in session.get_modelmeta().custom_metadata_map


def test_dynamic_batch_and_fp32_io_in_both_variants(repo: Path) -> None:
    for file in (MODEL_FILE, FP16_MODEL_FILE):
        proto = onnx.load(str(repo / "lenet" / "1" / file))
        (inp,), (out,) = proto.graph.input, proto.graph.output
        assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert inp.type.tensor_type.shape.dim[0].dim_param
    fp16 = onnx.load(str(repo / "lenet" / "1" / FP16_MODEL_FILE))
    weight_types = {i.data_type for i in fp16.graph.initializer
                    if i.data_type != onnx.TensorProto.INT64}  # shape constants stay int64
    assert weight_types == {onnx.TensorProto.FLOAT16}


def test_config_describes_the_served_tensors(repo: Path) -> None:
    config = read_config(repo, "alexnet")
    (tensor_in,), (tensor_out,) = config.inputs, config.outputs
    assert tensor_in.name == "input" and tensor_in.shape == (1, 64, 64)
    assert tensor_out.name == "logits" and tensor_out.shape == (10,)
    assert config.labels == tuple("0123456789")
    assert list_models(repo) == sorted(TINY_CONFIGS)


def test_perturbed_weights_are_refused_and_nothing_is_published(
        trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def export_then_perturb(*args: object, **kwargs: object) -> onnx.ModelProto:
        proto = export_onnx(*args, **kwargs)  # type: ignore[arg-type]
        weights = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
        array = onnx.numpy_helper.to_array(weights) + np.float32(0.05)
        weights.CopyFrom(onnx.numpy_helper.from_array(array, weights.name))
        return proto

    monkeypatch.setattr(export.pipeline, "export_onnx", export_then_perturb)
    with pytest.raises(ParityError, match=r"refusing to publish lenet.*fp32: max\|diff\| .* "
                                          r"\(allowed 0.0001\)") as err:
        export_checkpoint(trained_run / "lenet" / "checkpoint.pt", tmp_path)
    assert not err.value.report.passed
    assert list_versions(tmp_path, "lenet") == []
    assert not (tmp_path / "lenet" / "config.json").exists()


def test_cli_exports_a_run_and_prints_the_table(trained_run: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--all", str(trained_run), "--repo", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "max|Δ| vs torch" in out and "ORT CPU b1 / b32" in out
    assert out.count("published") >= 3
    # A second export of the same run becomes version 2 of each model.
    assert main([str(trained_run / "lenet" / "checkpoint.pt"), "--repo", str(tmp_path)]) == 0
    assert list_versions(tmp_path, "lenet") == [1, 2]
    # --skip-existing recognises checkpoints already published (by content hash).
    capsys.readouterr()
    assert main(["--all", str(trained_run), "--repo", str(tmp_path), "--skip-existing"]) == 0
    assert capsys.readouterr().out.count("already published") == 3
    assert list_versions(tmp_path, "lenet") == [1, 2]


def test_cli_refuses_an_existing_version_and_a_bad_name(trained_run: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = str(trained_run / "lenet" / "checkpoint.pt")
    assert main([ckpt, "--repo", str(tmp_path), "--version", "3"]) == 0
    assert main([ckpt, "--repo", str(tmp_path), "--version", "3"]) == 1
    assert "lenet version 3 already exists" in capsys.readouterr().err
    assert main([ckpt, "--repo", str(tmp_path), "--name", "../escape"]) == 1
    assert "invalid model name '../escape'" in capsys.readouterr().err


def test_new_version_with_other_classes_is_refused(trained_run: Path, tmp_path: Path) -> None:
    export_checkpoint(trained_run / "lenet" / "checkpoint.pt", tmp_path, name="digits")
    with pytest.raises(RepositoryError, match=r"configured for inputs \[\[1, 28, 28\]\].*"
                                              r"this checkpoint has inputs \[\[1, 32, 32\]\]"):
        export_checkpoint(trained_run / "vgg11_bn" / "checkpoint.pt", tmp_path, name="digits")
    assert list_versions(tmp_path, "digits") == [1]
