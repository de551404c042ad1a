"""`python -m training`: train one or more models and print a table of test accuracy."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from contract.datasets import DATASETS, DatasetNotFoundError, load_dataset
from contract.table import format_table
from training.distributed import close_world, init_world
from training.models import ARCHITECTURES
from training.presets import PRESETS, recipe
from training.trainer import TrainConfig, TrainResult, train

# CLI flag -> TrainConfig field, for flags that override the preset when given.
_OVERRIDES = {"epochs": "epochs", "batch_size": "batch_size", "lr": "lr",
              "optimizer": "optimizer", "weight_decay": "weight_decay", "schedule": "schedule",
              "image_size": "image_size", "label_smoothing": "label_smoothing",
              "patience": "patience", "max_steps": "max_steps",
              "average_last": "average_last"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    p.add_argument("--model", nargs="+", default=["lenet"], choices=ARCHITECTURES,
                   metavar="ARCH", help=f"one or more of: {', '.join(ARCHITECTURES)}")
    p.add_argument("--dataset", default="mnist5k", choices=sorted(DATASETS))
    p.add_argument("--data-dir", type=Path, help="folder holding mnist/, fashion-mnist/, cifar10/")
    p.add_argument("--download", action="store_true",
                   help="fetch a missing mnist/fashion-mnist/cifar10 into --data-dir")
    p.add_argument("--preset", default="full", choices=PRESETS,
                   help="recipe defaults: full (best accuracy) or quick (the demo)")
    p.add_argument("--out", type=Path, default=Path("runs/latest"),
                   help="run folder: one sub-folder per model")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--optimizer", choices=("sgd", "adamw"))
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--schedule", choices=("onecycle", "cosine", "constant"))
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--image-size", type=int, help="input height and width in pixels")
    p.add_argument("--width-divisor", type=int, help="narrow AlexNet/VGG layers by this factor")
    p.add_argument("--variant", choices=("modern", "classic"), help="LeNet variant")
    p.add_argument("--no-augment", dest="augment", action="store_false", default=None)
    p.add_argument("--patience", type=int, help="stop after this many epochs without val gain")
    p.add_argument("--max-steps", type=int, help="cap on steps per epoch (smoke runs)")
    p.add_argument("--average-last", type=int,
                   help="keep the mean of the last N epochs' weights instead of the best "
                        "epoch on validation; 0 keeps the best epoch")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--skip-existing", action="store_true",
                   help="keep a model whose <out>/<model>/checkpoint.pt exists (resume a run)")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace, arch: str) -> TrainConfig:
    """The preset's recipe for `arch`, with every flag the user gave laid over it."""
    fields = recipe(arch, args.preset)
    fields.update({field: getattr(args, flag) for flag, field in _OVERRIDES.items()
                   if getattr(args, flag) is not None})
    if args.augment is not None:
        fields["augment"] = args.augment
    if args.width_divisor is not None and arch != "lenet":
        fields["arch_kwargs"]["width_divisor"] = args.width_divisor
    if args.variant is not None and arch == "lenet":
        fields["arch_kwargs"]["variant"] = args.variant
    return TrainConfig(**fields, seed=args.seed, device=args.device)


def results_table(results: Sequence[TrainResult]) -> str:
    rows = []
    for r in results:
        m = r.metadata
        c, h, w = m.preprocessing.input_shape
        rows.append((m.name, m.dataset, f"{c}x{h}x{w}", str(m.epochs_trained), str(m.best_epoch),
                     f"{m.val_accuracy:.2%}", f"{m.test_accuracy:.2%}", f"{r.seconds:.0f}s"))
    return format_table(("model", "dataset", "input", "epochs", "best", "val acc", "test acc",
                         "time"), rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        configs = [build_config(args, arch) for arch in args.model]
        dataset = load_dataset(args.dataset, args.data_dir, args.download)
    except (ValidationError, ValueError, DatasetNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.skip_existing:
        for cfg in [c for c in configs if (args.out / c.arch / "checkpoint.pt").is_file()]:
            print(f"{cfg.arch}: {args.out / cfg.arch / 'checkpoint.pt'} exists, not retraining")
            configs.remove(cfg)
    world = init_world(args.device)  # torchrun: join the process group; else one process
    try:
        results = [train(cfg, dataset, args.out / cfg.arch, progress=args.progress, world=world)
                   for cfg in configs]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        close_world(world)
    if not world.is_main or not results:
        return 0
    table = results_table(results)
    print(f"\nTest accuracy on {dataset.name} ({len(dataset.test)} held-out images):\n{table}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(
        [{"model": r.metadata.name, "checkpoint": str(r.checkpoint), "seconds": r.seconds,
          "val_accuracy": r.metadata.val_accuracy, "test_accuracy": r.metadata.test_accuracy}
         for r in results], indent=2))
    print(f"checkpoints in {args.out}/<model>/checkpoint.pt")
    return 0
