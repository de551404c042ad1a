"""`python -m export`: checkpoints -> verified ONNX versions in the model repository."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from contract.datasets import DatasetNotFoundError
from contract.repository import RepositoryError
from contract.table import format_table
from export.onnx_export import DEFAULT_OPSET, ExportError
from export.pipeline import ExportReport, ParityError, export_checkpoint, find_published


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("checkpoint", nargs="?", type=Path, help="a checkpoint.pt from training")
    src.add_argument("--all", type=Path, metavar="RUN_DIR",
                     help="export every <RUN_DIR>/<model>/checkpoint.pt of a training run")
    p.add_argument("--repo", type=Path, default=Path("model_repository"))
    p.add_argument("--name", help="model name in the repository (default: the checkpoint's)")
    p.add_argument("--version", type=int, help="version number (default: next free)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--fp16", action="store_true", help="also publish model.fp16.onnx for GPUs")
    p.add_argument("--optimize", action="store_true",
                   help="publish onnxruntime's basic-level optimised graph if parity holds")
    p.add_argument("--max-batch-size", type=int, default=32,
                   help="written to a new model's config.json")
    p.add_argument("--data-dir", type=Path, help="where mnist/fashion-mnist/cifar10 live")
    p.add_argument("--skip-existing", action="store_true",
                   help="skip checkpoints the repository already holds a version of")
    args = p.parse_args(argv)
    if args.all and (args.name or args.version):
        p.error("--name and --version name one model; they do not combine with --all")
    return args


def report_rows(report: ExportReport) -> list[list[str]]:
    rows = []
    for v in report.variants:
        worst = v.worst
        rows.append([
            f"{report.model}:{report.version}", v.precision, f"{v.size_bytes / 2**20:.1f} MiB",
            f"{worst.max_abs_diff:.2e}", f"{min(p.top1_agreement for p in v.parity):.2%}",
            f"{min(p.accuracy for p in v.parity):.2%}",
            f"{v.latency_ms[1]:.2f} / {v.latency_ms[32]:.2f} ms",
            "published" if report.passed else "REFUSED"])
    return rows


HEADER = ("model", "precision", "ONNX size", "max|Δ| vs torch", "top-1 agree", "test acc",
          "ORT CPU b1 / b32", "status")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    checkpoints = (sorted(args.all.glob("*/checkpoint.pt")) if args.all else [args.checkpoint])
    if not checkpoints:
        print(f"error: no */checkpoint.pt under {args.all}", file=sys.stderr)
        return 2
    rows: list[list[str]] = []
    failures = 0
    for checkpoint in checkpoints:
        if args.skip_existing and (found := find_published(checkpoint, args.repo)):
            print(f"{checkpoint}: already published as {found[0]} version {found[1]}, skipped")
            continue
        try:
            report = export_checkpoint(
                checkpoint, args.repo, name=args.name, version=args.version, opset=args.opset,
                fp16=args.fp16, optimize=args.optimize, data_dir=args.data_dir,
                max_batch_size=args.max_batch_size)
        except ParityError as exc:
            rows += report_rows(exc.report)
            print(f"error: {exc}", file=sys.stderr)
            failures += 1
            continue
        except (ExportError, RepositoryError, DatasetNotFoundError, FileNotFoundError,
                ValueError) as exc:
            print(f"error: {checkpoint}: {exc}", file=sys.stderr)
            failures += 1
            continue
        rows += report_rows(report)
        print(f"{report.model}: version {report.version} published to {args.repo} "
              f"({report.optimization_note})", flush=True)
    if rows:
        print(f"\nParity on each model's held-out test split (batch sizes 1, 7, 32):\n"
              f"{format_table(HEADER, rows)}")
    return 1 if failures else 0
