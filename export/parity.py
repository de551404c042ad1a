"""Does the ONNX graph compute what the checkpoint computes? Measured on held-out images."""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from export.onnx_export import INPUT_NAME

PARITY_BATCH_SIZES = (1, 7, 32)


class ParityFigures(BaseModel):
    model_config = ConfigDict(frozen=True)

    batch_size: int
    images: int
    max_abs_diff: float
    top1_agreement: float
    """Share of images whose ONNX top-1 class equals PyTorch's."""
    accuracy: float
    """ONNX top-1 accuracy against the true labels."""


def cpu_session(model: bytes, threads: int = 0) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


@torch.no_grad()
def torch_logits(model: nn.Module, x: np.ndarray, batch_size: int = 100) -> np.ndarray:
    model.eval()
    return np.concatenate([model(torch.from_numpy(x[i:i + batch_size])).numpy()
                           for i in range(0, len(x), batch_size)])


def ort_logits(session: ort.InferenceSession, x: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([session.run(None, {INPUT_NAME: x[i:i + batch_size]})[0]
                           for i in range(0, len(x), batch_size)])


def compare(reference: np.ndarray, session: ort.InferenceSession, x: np.ndarray,
            labels: np.ndarray, batch_sizes: tuple[int, ...] = PARITY_BATCH_SIZES
            ) -> list[ParityFigures]:
    """Run the whole split through ONNX at each batch size and compare with `reference`."""
    figures = []
    for bs in batch_sizes:
        got = ort_logits(session, x, bs)
        figures.append(ParityFigures(
            batch_size=bs, images=len(x),
            max_abs_diff=float(np.max(np.abs(got.astype(np.float64) - reference))),
            top1_agreement=float(np.mean(got.argmax(1) == reference.argmax(1))),
            accuracy=float(np.mean(got.argmax(1) == labels))))
    return figures


def latency_ms(session: ort.InferenceSession, x: np.ndarray, batch_size: int,
               max_runs: int = 50, max_seconds: float = 2.0) -> float:
    """Median wall time of one `run` at `batch_size`, bounded in runs and time."""
    batch = np.ascontiguousarray(np.resize(x, (batch_size, *x.shape[1:])))
    for _ in range(3):
        session.run(None, {INPUT_NAME: batch})
    times: list[float] = []
    deadline = time.perf_counter() + max_seconds
    while len(times) < max_runs and (len(times) < 5 or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        session.run(None, {INPUT_NAME: batch})
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)
