"""How many threads a CPU session splits a batch over: one per core, except for a model
too small to gain from it.

onnxruntime's intra-op pool splits each operator between its threads and waits for them.
For a LeNet-sized model that synchronisation costs more than the work it shares out,
and under load the pool's threads take the cores the transport needs; a larger model's
operators are worth sharing out. Where a model falls between depends on the host (its
cores, their speed, what else runs), so where the thread count is left to the service
(0), a model whose single image runs in under SMALL_MODEL_S has a batch timed on the
pool and on one thread at warm-up, and keeps the pool only where it earns the CPU it
takes (docs/results.md has the figures).

Imports only onnxruntime and numpy: the peers' harness applies the same rule, so every
server compared runs the same sessions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

SMALL_MODEL_S = 1e-3
"""A model whose single image takes longer on the pool keeps it without a trial: its
operators are large enough to share out."""
TRIAL_ROWS = 8
"""The batch both sessions are timed on: a small model's batches under load."""
POOL_GAIN = 1.25
"""How much faster the pool must run that batch to be kept: it costs every thread's CPU."""
TIMED_RUNS = 10
ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
             "tensor(double)": np.float64, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
             "tensor(bool)": np.bool_}
"""onnxruntime's tensor types as numpy's, for the types a session can be fed zeros of."""

Timer = Callable[[ort.InferenceSession, int, int], "float | None"]


@dataclass(frozen=True)
class ThreadTrial:
    """A small model's batch of TRIAL_ROWS, timed (the fastest of TIMED_RUNS) on the
    pool and on one thread."""

    pooled_s: float
    single_s: float

    @property
    def keeps_pool(self) -> bool:
        return self.single_s >= POOL_GAIN * self.pooled_s

    def __str__(self) -> str:
        return (f"a batch of {TRIAL_ROWS} took {self.single_s * 1e3:.3f} ms on one thread, "
                f"{self.pooled_s * 1e3:.3f} ms on the pool")


def fitted_session(pooled: ort.InferenceSession, single: Callable[[], ort.InferenceSession],
                   timer: Timer | None = None
                   ) -> tuple[ort.InferenceSession, ThreadTrial | None]:
    """`pooled` (a session of one thread per core), or the session `single()` makes (the
    same model on one thread) where a trial finds the pool does not earn its CPU; with
    the trial, None where none ran (a model too large for one thread, or one whose input
    cannot be made up). `timer` (default `run_s`) times a session on a batch."""
    time_it = timer or run_s
    one_image_s = time_it(pooled, 1, 3)
    if one_image_s is None or one_image_s >= SMALL_MODEL_S:
        return pooled, None
    pooled_s = time_it(pooled, TRIAL_ROWS, TIMED_RUNS)
    candidate = single()
    single_s = time_it(candidate, TRIAL_ROWS, TIMED_RUNS)
    if pooled_s is None or single_s is None:
        return pooled, None
    trial = ThreadTrial(pooled_s, single_s)
    return (pooled if trial.keeps_pool else candidate), trial


def run_s(session: ort.InferenceSession, rows: int, runs: int) -> float | None:
    """The fastest of `runs` runs on `rows` images of zeros (after one untimed run); None
    where no input can be made up (a shape past the first dimension that is not fixed,
    a type that is not a plain number) or the model refuses zeros. A model with a fixed
    first dimension is run on that many."""
    feeds = {}
    for spec in session.get_inputs():
        dtype = ORT_TYPES.get(spec.type)
        if dtype is None or not spec.shape or not all(isinstance(d, int) for d in spec.shape[1:]):
            return None
        lead = spec.shape[0] if isinstance(spec.shape[0], int) else rows
        feeds[spec.name] = np.zeros((lead, *spec.shape[1:]), dtype)
    fastest = float("inf")
    try:
        session.run(None, feeds)
        for _ in range(runs):
            started = time.perf_counter()
            session.run(None, feeds)
            fastest = min(fastest, time.perf_counter() - started)
    except Exception:  # noqa: BLE001 - the model's own errors are for its requests to show
        return None
    return fastest
