"""Shared fixtures: tiny real models, trained for a few steps on the embedded digits."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.datasets import Dataset, load_dataset

# Small but real configurations of every family, fast enough for CI on two cores.
TINY_CONFIGS: dict[str, dict[str, object]] = {
    "lenet": {"arch": "lenet", "image_size": 28},
    "alexnet": {"arch": "alexnet", "image_size": 64,
                "arch_kwargs": {"width_divisor": 16, "pool_size": 2}},
    "vgg11_bn": {"arch": "vgg11_bn", "image_size": 32,
                 "arch_kwargs": {"width_divisor": 16, "pool_size": 1}},
}


@pytest.fixture(scope="session")
def mnist5k() -> Dataset:
    return load_dataset("mnist5k")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, mnist5k: Dataset) -> Path:
    """A training run folder holding one briefly trained checkpoint per family."""
    from training.trainer import TrainConfig, train

    out = tmp_path_factory.mktemp("run")
    for name, fields in TINY_CONFIGS.items():
        cfg = TrainConfig(**fields, epochs=1, max_steps=15, batch_size=64,  # type: ignore[arg-type]
                          optimizer="adamw", lr=3e-3, weight_decay=1e-4, device="cpu")
        train(cfg, mnist5k, out / name, progress=False)
    return out
