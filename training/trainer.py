"""The training loop: seeded batches, optional augmentation, best-on-validation checkpoint."""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, update_bn
from tqdm import tqdm

from contract.datasets import Dataset, Split
from contract.metadata import ModelMetadata, Preprocessing, Recipe, TrainingRecipe
from training.checkpoint import save_checkpoint
from training.distributed import SINGLE_PROCESS, World
from training.models import INIT_SCHEME, build_model


class TrainConfig(Recipe):
    """One model's training run, fully resolved (preset defaults plus CLI overrides): the
    recipe, and what it trains on which device."""

    arch: str
    arch_kwargs: dict[str, int | float | str | bool] = Field(default_factory=dict)
    image_size: int = Field(gt=0)
    patience: int | None = Field(default=None, gt=0)
    average_last: int = Field(default=0, ge=0)
    """Keep the mean of the last N epochs' weights (SWA, batch norm re-estimated) rather
    than the best single epoch on validation; 0 keeps the best epoch. At most the last third
    of the run is averaged, so a shortened run (`--epochs 6`) leaves out its early epochs."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_steps: int | None = Field(default=None, gt=0)
    """Stop each epoch after this many steps (for tests and smoke runs)."""

    @property
    def window(self) -> int:
        """Epochs averaged into the checkpoint: `average_last`, at most a third of the run."""
        return min(self.average_last, max(1, self.epochs // 3))

    def recipe(self) -> TrainingRecipe:
        """The recipe as the metadata records it: these choices and what the run applied."""
        return TrainingRecipe(**self.model_dump(include=set(Recipe.model_fields)),
                              init=INIT_SCHEME, early_stopping_patience=self.patience,
                              average_last=self.window)


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float
    images_per_s: float
    seconds: float


@dataclass
class TrainResult:
    metadata: ModelMetadata
    history: list[EpochRecord] = field(default_factory=list)
    checkpoint: Path | None = None
    seconds: float = 0.0


def resolve_device(device: str, world: World = SINGLE_PROCESS) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device("cuda", world.local_rank) if device == "cuda" else torch.device("cpu")


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 (N, H, W, C) images, on the 0-1 scale."""
    x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return tuple(float(v) for v in x.mean(0)), tuple(float(v) for v in x.std(0))


class _Batches:
    """Keeps a split as one uint8 tensor on the device and yields normalised batches."""

    def __init__(self, split: Split, mean: tuple[float, ...], std: tuple[float, ...],
                 device: torch.device) -> None:
        self.images = torch.from_numpy(split.images).permute(0, 3, 1, 2).contiguous().to(device)
        self.labels = torch.from_numpy(split.labels).to(device)
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: torch.Tensor, augment: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[idx].float().div_(255.0)
        if augment is not None:
            x = random_affine(x, augment)
        return (x - self.mean) / self.std, self.labels[idx]

    def in_order(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The whole split, unaugmented, in consecutive batches."""
        for start in range(0, len(self), batch_size):
            yield self.batch(torch.arange(start, min(start + batch_size, len(self)),
                                          device=self.labels.device))


def random_affine(x: torch.Tensor, gen: torch.Generator, max_degrees: float = 10.0,
                  max_shift: float = 0.1, scale: tuple[float, float] = (0.9, 1.1)) -> torch.Tensor:
    """Small random rotations, shifts and zooms per image; the background stays black."""
    n = x.shape[0]
    rand = torch.rand(n, 4, generator=gen, device=gen.device).to(x.device)
    angle = (rand[:, 0] * 2 - 1) * math.radians(max_degrees)
    zoom = scale[0] + rand[:, 1] * (scale[1] - scale[0])
    shift = (rand[:, 2:] * 2 - 1) * max_shift * 2  # affine_grid spans [-1, 1]
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@torch.no_grad()
def evaluate(model: nn.Module, data: _Batches, batch_size: int = 500) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy over a whole split."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for x, y in data.in_order(batch_size):
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    return loss_sum / len(data), correct / len(data)


def _optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    # No weight decay on biases and batch-norm parameters.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int
               ) -> torch.optim.lr_scheduler.LRScheduler:
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        # OneCycleLR divides by each phase's length: smoke runs of a few steps need a floor.
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(total, 10),
                                                   pct_start=0.2)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def _steps_per_epoch(cfg: TrainConfig, images: int, world: World) -> int:
    if world.distributed and cfg.batch_size % world.size:
        raise ValueError(f"batch size {cfg.batch_size} must divide evenly over "
                         f"{world.size} processes")
    # Distributed runs drop a last partial batch so that every rank's share is equal.
    steps = images // cfg.batch_size if world.distributed else math.ceil(images / cfg.batch_size)
    return min(steps, cfg.max_steps) if cfg.max_steps is not None else steps


@dataclass
class _Run:
    """What one run's epochs share: the model, its data, optimiser state and random streams."""

    cfg: TrainConfig
    model: nn.Module
    net: nn.Module
    """`model`, wrapped in DistributedDataParallel under torchrun."""
    train_data: _Batches
    val_data: _Batches
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    steps_per_epoch: int
    shuffle: torch.Generator
    augment: torch.Generator | None
    world: World
    label: str
    progress: bool

    def epoch(self, epoch: int) -> EpochRecord:
        """One pass over the training split, then the validation score."""
        cfg, world, device = self.cfg, self.world, self.train_data.labels.device
        self.model.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(self.train_data), generator=self.shuffle).to(device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        bar = tqdm(range(self.steps_per_epoch), desc=f"{self.label} {epoch}/{cfg.epochs}",
                   unit="batch", leave=False, disable=not self.progress or None)
        for step in bar:
            idx = world.shard(order[step * cfg.batch_size:(step + 1) * cfg.batch_size])
            x, y = self.train_data.batch(idx, self.augment)
            logits = self.net(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
            loss_sum += loss.detach() * len(idx)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(idx)
            if step % 10 == 0 or step == self.steps_per_epoch - 1:
                rate = seen / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{float(loss_sum) / seen:.4f}",
                                acc=f"{int(correct) / seen:.4f}", img_s=f"{rate:.0f}")
        train_seconds = time.perf_counter() - t0
        loss_sum, correct = world.sum(loss_sum), world.sum(correct)
        seen *= world.size
        # Every rank holds the same weights, so every rank reaches the same decisions.
        val_loss, val_acc = evaluate(self.model, self.val_data)
        return EpochRecord(epoch, float(loss_sum) / seen, int(correct) / seen, val_loss, val_acc,
                           self.opt.param_groups[0]["lr"], seen / train_seconds,
                           time.perf_counter() - t0)


def train(cfg: TrainConfig, dataset: Dataset, out_dir: Path | None, name: str | None = None,
          progress: bool = True, world: World = SINGLE_PROCESS) -> TrainResult:
    """Train one model; write checkpoint.pt, metrics.json and curves.png to `out_dir`.

    Under torchrun (`world.distributed`) every rank runs this with the same arguments;
    rank 0 alone reports and writes files.
    """
    started = time.perf_counter()
    device = resolve_device(cfg.device, world)
    torch.manual_seed(cfg.seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    else:
        torch.backends.cudnn.benchmark = True

    data = dataset.resized(cfg.image_size, cfg.image_size)
    mean, std = channel_stats(data.train.images)
    prep = Preprocessing(color=dataset.color, height=cfg.image_size, width=cfg.image_size,
                         mean=mean, std=std)
    arch_kwargs = {"in_channels": prep.channels, "num_classes": len(dataset.class_names),
                   **cfg.arch_kwargs}
    model = build_model(cfg.arch, **arch_kwargs).to(device)
    train_data, val_data, test_data = (_Batches(s, mean, std, device)
                                       for s in (data.train, data.val, data.test))
    steps_per_epoch = _steps_per_epoch(cfg, len(train_data), world)
    opt = _optimizer(cfg, model)
    run = _Run(
        cfg, model,
        # DDP broadcasts rank 0's initial weights and averages gradients across ranks.
        DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                else None) if world.distributed else model,
        train_data, val_data, opt, _scheduler(cfg, opt, steps_per_epoch), steps_per_epoch,
        shuffle=torch.Generator().manual_seed(cfg.seed),  # same order on every rank
        augment=torch.Generator(device=device).manual_seed(cfg.seed + 1 + world.rank)
        if cfg.augment else None,
        world=world, label=name or cfg.arch, progress=progress and world.is_main)

    history: list[EpochRecord] = []
    best_acc, best_epoch, best_state = -1.0, 0, copy.deepcopy(model.state_dict())
    last_gain = 0  # the epoch of the latest strict gain, for early stopping
    averaged = AveragedModel(model) if cfg.window else None
    for epoch in range(1, cfg.epochs + 1):
        record = run.epoch(epoch)
        history.append(record)
        # A tie keeps the later, further-annealed weights: on 500 held-out training digits
        # that never did worse than keeping the first (VGG, 6 runs: up to +1.2%).
        kept = record.val_accuracy >= best_acc
        if record.val_accuracy > best_acc:
            last_gain = epoch
        if kept:
            best_acc, best_epoch = record.val_accuracy, epoch
            best_state = copy.deepcopy(model.state_dict())
        if world.is_main:
            print(f"{run.label} epoch {epoch}/{cfg.epochs}: loss {record.train_loss:.4f} "
                  f"train {record.train_accuracy:.4f} val {record.val_accuracy:.4f}"
                  f"{' *' if kept else ''} {record.images_per_s:.0f} img/s", flush=True)
        if averaged is not None and epoch > cfg.epochs - cfg.window:
            averaged.update_parameters(model)
        if cfg.patience is not None and epoch - last_gain >= cfg.patience:
            if world.is_main:
                print(f"{run.label}: no validation gain for {cfg.patience} epochs, "
                      "stopping early")
            break

    used_average = False
    if averaged is not None and int(averaged.n_averaged) > 0:
        best_acc, best_state = _keep_average(run, averaged)
        best_epoch, used_average = len(history), True
    elif averaged is not None and world.is_main:
        print(f"{run.label}: stopped before the last {cfg.window} epochs; keeping the best "
              f"epoch ({best_epoch})", flush=True)
    model.load_state_dict(best_state)
    _, test_acc = evaluate(model, test_data)
    metadata = ModelMetadata(
        name=run.label, arch=cfg.arch, arch_kwargs=arch_kwargs, preprocessing=prep,
        class_names=dataset.class_names, dataset=dataset.name, recipe=cfg.recipe(),
        epochs_trained=len(history), best_epoch=best_epoch, averaged=used_average,
        val_accuracy=best_acc, test_accuracy=test_acc, torch_version=torch.__version__,
        device=f"{device.type} x{world.size} (DDP)" if world.distributed else str(device),
        created_at=datetime.now(UTC))
    result = TrainResult(metadata, history)
    if out_dir is not None and world.is_main:
        result.checkpoint = out_dir / "checkpoint.pt"
        save_checkpoint(result.checkpoint, model, metadata)
        write_metrics(out_dir, metadata, history)
    result.seconds = time.perf_counter() - started
    return result


def _keep_average(run: _Run, averaged: AveragedModel) -> tuple[float, dict[str, torch.Tensor]]:
    """The averaged weights with batch-norm statistics measured again, and their val score.

    The mean is kept whatever its validation score: a 500-image split picks among
    near-equal epochs by noise, and the pick scores on it are biased upward. On held-out
    training digits the mean generalised better than the epoch validation picked.
    """
    # Batch-norm statistics of averaged weights must be measured on clean images.
    update_bn((x for x, _ in run.train_data.in_order(run.cfg.batch_size)), averaged.module)
    _, val_acc = evaluate(averaged.module, run.val_data)
    if run.world.is_main:
        print(f"{run.label}: keeping the mean of the last {int(averaged.n_averaged)} epochs: "
              f"val {val_acc:.4f}", flush=True)
    return val_acc, averaged.module.state_dict()


def write_metrics(out_dir: Path, metadata: ModelMetadata, history: list[EpochRecord]) -> None:
    """metrics.json (per-epoch figures) and curves.png (loss and accuracy per epoch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps({
        "model": metadata.name, "dataset": metadata.dataset, "best_epoch": metadata.best_epoch,
        "val_accuracy": metadata.val_accuracy, "test_accuracy": metadata.test_accuracy,
        "epochs": [vars(r) for r in history]}, indent=2))
    epochs = [r.epoch for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r.train_loss for r in history], label="train")
    ax_loss.plot(epochs, [r.val_loss for r in history], label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title=f"{metadata.name} loss")
    ax_acc.plot(epochs, [r.train_accuracy for r in history], label="train")
    ax_acc.plot(epochs, [r.val_accuracy for r in history], label="validation")
    ax_acc.set(xlabel="epoch", ylabel="top-1 accuracy", title=f"{metadata.name} accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "curves.png", dpi=100)
    plt.close(fig)
