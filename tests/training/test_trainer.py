import json
from pathlib import Path

import pytest
import torch

from contract.datasets import Dataset
from contract.metadata import ModelMetadata
from training.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from training.cli import main
from training.trainer import TrainConfig, random_affine, train


def lenet_config(**overrides: object) -> TrainConfig:
    fields: dict[str, object] = {"arch": "lenet", "image_size": 28, "epochs": 3, "max_steps": 20,
                                 "batch_size": 64, "optimizer": "adamw", "lr": 3e-3,
                                 "weight_decay": 1e-4, "device": "cpu", **overrides}
    return TrainConfig(**fields)  # type: ignore[arg-type]


def test_short_training_run_lowers_the_loss_and_beats_chance(mnist5k: Dataset) -> None:
    result = train(lenet_config(), mnist5k, None, progress=False)
    losses = [r.train_loss for r in result.history]
    assert losses[-1] < losses[0] * 0.7
    assert result.metadata.val_accuracy > 0.5  # chance is 0.1
    assert result.metadata.best_epoch == max(range(1, 4), key=lambda e: (
        result.history[e - 1].val_accuracy, e))


def test_a_validation_tie_keeps_the_later_epoch_but_does_not_reset_patience(
        mnist5k: Dataset) -> None:
    # A learning rate this small leaves every epoch with the same validation accuracy.
    result = train(lenet_config(epochs=4, max_steps=2, lr=1e-12, patience=2), mnist5k, None,
                   progress=False)
    assert len({r.val_accuracy for r in result.history}) == 1
    assert len(result.history) == 3  # no gain after epoch 1: stopped after 2 more
    assert result.metadata.best_epoch == 3


def test_training_is_deterministic_on_cpu_for_a_seed(mnist5k: Dataset, tmp_path: Path) -> None:
    a = train(lenet_config(epochs=1, seed=3), mnist5k, tmp_path / "a", progress=False)
    b = train(lenet_config(epochs=1, seed=3), mnist5k, tmp_path / "b", progress=False)
    c = train(lenet_config(epochs=1, seed=4), mnist5k, tmp_path / "c", progress=False)
    assert a.checkpoint and b.checkpoint and c.checkpoint
    wa, wb, wc = (torch.load(p, weights_only=True)["state_dict"]
                  for p in (a.checkpoint, b.checkpoint, c.checkpoint))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_run_writes_checkpoint_metrics_and_curves(trained_run: Path) -> None:
    folder = trained_run / "vgg11_bn"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["model"] == "vgg11_bn" and len(metrics["epochs"]) == 1
    assert {"train_loss", "val_accuracy", "images_per_s"} <= metrics["epochs"][0].keys()
    assert (folder / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_checkpoint_round_trip_gives_identical_outputs(trained_run: Path, mnist5k: Dataset
                                                       ) -> None:
    model, meta = load_checkpoint(trained_run / "vgg11_bn" / "checkpoint.pt")
    payload = torch.load(trained_run / "vgg11_bn" / "checkpoint.pt", weights_only=True)
    assert payload["format"] == CHECKPOINT_FORMAT
    assert meta.arch == "vgg11_bn" and meta.preprocessing.input_shape == (1, 32, 32)
    assert meta.class_names == tuple("0123456789") and meta.dataset == "mnist5k"
    assert meta.recipe.optimizer == "adamw" and meta.torch_version == torch.__version__
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        expected = model(x)
    again, _ = load_checkpoint(trained_run / "vgg11_bn" / "checkpoint.pt")
    with torch.no_grad():
        assert torch.equal(again(x), expected)


def test_checkpoint_metadata_is_validated_and_foreign_files_refused(trained_run: Path,
                                                                    tmp_path: Path) -> None:
    model, meta = load_checkpoint(trained_run / "lenet" / "checkpoint.pt")
    with pytest.raises(ValueError, match="one value per channel: expected 1"):
        ModelMetadata.model_validate(
            {**meta.model_dump(), "preprocessing": {**meta.preprocessing.model_dump(),
                                                    "mean": (0.1, 0.2, 0.3)}})
    save_checkpoint(tmp_path / "ok.pt", model, meta)
    torch.save({"weights": model.state_dict()}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="expected a cnnserve-checkpoint/1 checkpoint, found None"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_augmentation_moves_pixels_but_keeps_shape_and_range(mnist5k: Dataset) -> None:
    x = torch.from_numpy(mnist5k.train.images[:8]).permute(0, 3, 1, 2).float() / 255
    gen = torch.Generator().manual_seed(0)
    y = random_affine(x, gen)
    assert y.shape == x.shape
    assert float((y - x).abs().mean()) > 0.01
    assert float(y.min()) >= 0 and float(y.max()) <= 1.0 + 1e-6


def test_cli_trains_and_prints_a_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--model", "lenet", "--preset", "quick", "--epochs", "1", "--max-steps", "5",
                 "--out", str(tmp_path), "--no-progress", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    assert "test acc" in out and "lenet" in out
    assert (tmp_path / "lenet" / "checkpoint.pt").is_file()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary[0]["model"] == "lenet"


def test_cli_reports_a_missing_dataset_without_a_traceback(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--dataset", "mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path)])
    assert code == 2
    assert "train-images-idx3-ubyte" in capsys.readouterr().err


def test_skip_existing_keeps_trained_checkpoints(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--model", "lenet", "--epochs", "1", "--max-steps", "2", "--out", str(tmp_path),
            "--no-progress", "--device", "cpu", "--skip-existing"]
    assert main(args) == 0
    checkpoint = tmp_path / "lenet" / "checkpoint.pt"
    first = checkpoint.read_bytes()
    capsys.readouterr()
    assert main(args) == 0
    assert "exists, not retraining" in capsys.readouterr().out
    assert checkpoint.read_bytes() == first


def test_averaging_keeps_the_mean_of_the_last_epochs(
        mnist5k: Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpoint is the plain mean of the last epochs' weights (at most the last third
    of the run), even where a single epoch scored higher on validation; its own validation
    score is the one recorded."""
    import training.trainer as trainer

    seen: list[tuple[dict[str, torch.Tensor], float]] = []
    evaluate = trainer.evaluate

    def spy(model: torch.nn.Module, data: object, batch_size: int = 500) -> tuple[float, float]:
        loss, acc = evaluate(model, data, batch_size)  # type: ignore[arg-type]
        seen.append(({k: v.clone() for k, v in model.state_dict().items()}, acc))
        return loss, acc

    monkeypatch.setattr(trainer, "evaluate", spy)
    result = train(lenet_config(epochs=6, max_steps=10, average_last=4), mnist5k, None,
                   progress=False)
    epochs, mean, test = seen[:6], seen[6], seen[7]
    for key, value in mean[0].items():
        torch.testing.assert_close(value, (epochs[4][0][key] + epochs[5][0][key]) / 2)
        torch.testing.assert_close(test[0][key], value)  # the test split saw the mean
    meta = result.metadata
    assert meta.averaged and meta.recipe.average_last == 2 and meta.best_epoch == 6
    assert meta.val_accuracy == mean[1]


def test_early_stopping_before_the_averaged_epochs_keeps_the_best_epoch(
        mnist5k: Dataset) -> None:
    result = train(lenet_config(epochs=6, max_steps=2, lr=1e-12, patience=1, average_last=2),
                   mnist5k, None, progress=False)
    assert len(result.history) == 2  # stopped before epoch 5, the first one averaged
    assert not result.metadata.averaged and result.metadata.best_epoch == 2
