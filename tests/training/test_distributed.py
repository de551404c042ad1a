"""torchrun with DistributedDataParallel: the same training, split over processes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import torch

from tests.servers import ROOT
from training.checkpoint import load_checkpoint
from training.cli import main

ARGS = ["--model", "lenet", "--epochs", "1", "--max-steps", "5", "--no-augment",
        "--batch-size", "64", "--device", "cpu", "--no-progress"]


def test_two_torchrun_processes_learn_the_same_weights_as_one(tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "training", *ARGS,
         "--out", str(tmp_path / "ddp")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Test accuracy on mnist5k") == 1  # rank 0 alone reports
    assert main([*ARGS, "--out", str(tmp_path / "single")]) == 0
    ddp_model, ddp_meta = load_checkpoint(tmp_path / "ddp" / "lenet" / "checkpoint.pt")
    one_model, _ = load_checkpoint(tmp_path / "single" / "lenet" / "checkpoint.pt")
    assert ddp_meta.device == "cpu x2 (DDP)"
    # Averaged gradients of two half-batches equal the whole batch's gradient.
    for (name, a), (_, b) in zip(ddp_model.state_dict().items(),
                                 one_model.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_a_batch_that_does_not_split_evenly_is_refused(tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "training", *ARGS,
         "--batch-size", "63", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
        text=True, timeout=300)
    assert result.returncode != 0
    assert "batch size 63 must divide evenly over 2 processes" in result.stderr
