"""Shared fixtures: tiny real models, trained for a few steps on the embedded digits."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from contract.datasets import Dataset, load_dataset
from tests.servers import ServerProcess, start_server

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


@pytest.fixture(scope="session")
def served_repo(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.pipeline import export_checkpoint

    repo = tmp_path_factory.mktemp("served-repo")
    for name in TINY_CONFIGS:
        export_checkpoint(trained_run / name / "checkpoint.pt", repo, fp16=True)
    return repo


@pytest.fixture
def server_factory() -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def factory(repo: Path, *args: str, **kwargs: object) -> ServerProcess:
        server = start_server(repo, *args, **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield factory
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(10)


@pytest.fixture(scope="module")
def server(served_repo: Path) -> Iterator[ServerProcess]:
    """One shared server for tests that do not change its state."""
    server = start_server(served_repo)
    yield server
    assert server.terminate() == 0, "".join(server.lines)
