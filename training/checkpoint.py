"""Checkpoint files: a state_dict plus `ModelMetadata`, loadable with `weights_only=True`."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from contract.metadata import ModelMetadata
from training.models import build_model

CHECKPOINT_FORMAT = "cnnserve-checkpoint/1"


def save_checkpoint(path: Path, model: nn.Module, metadata: ModelMetadata) -> None:
    """Write atomically: a crash never leaves a truncated checkpoint behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "metadata": metadata.model_dump(mode="json"),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path: Path) -> tuple[nn.Module, ModelMetadata]:
    """Rebuild the model from its metadata and load its weights, in eval mode on the CPU."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path}: expected a {CHECKPOINT_FORMAT} checkpoint, found {found!r}")
    metadata = ModelMetadata.model_validate(payload["metadata"])
    model = build_model(metadata.arch, **metadata.arch_kwargs)
    model.load_state_dict(payload["state_dict"])
    return model.eval(), metadata


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
