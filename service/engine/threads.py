"""How many threads a CPU session splits one batch over: one per core, except for a model
too small to gain from it.

onnxruntime's intra-op pool splits each operator between its threads and waits for them.
For a LeNet-sized model that synchronisation costs more than the work it shares out: a
single image takes more CPU and more time on two threads than on one, and under load the
second thread takes the core the transport needs; even a batch of eight gains little. A
model only somewhat larger (the quick VGG) runs its batches far faster on the pool. So
where the thread count is left to the service (0), a small model's batch is timed both
ways, and the pool is kept for batches only where it earns the CPU it takes
(docs/results.md has the figures).

Imports only onnxruntime and numpy: the peers' harness applies the same rule, so every
server compared runs the same sessions.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import onnxruntime as ort

SMALL_MODEL_S = 1e-3
"""Models whose single image takes longer on the full pool keep it without a trial."""
TRIAL_ROWS = 8
"""The batch both sessions are timed on: a small model's batches under load."""
POOL_GAIN = 1.25
"""How much faster the pool must run that batch to be kept: it costs every thread's CPU."""
_TIMED_RUNS = 10
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
           "tensor(double)": np.float64, "tensor(uint8)": np.uint8,
           "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def cpu_sessions(make: Callable[[int], ort.InferenceSession], threads: int
                 ) -> tuple[ort.InferenceSession, ort.InferenceSession]:
    """The sessions for batches and for a lone caller's request, where `make(n)` builds
    one with n intra-op threads: both `make(threads)`, except for `threads` 0 (one per
    core) and a small model (one image in under SMALL_MODEL_S) whose batch of TRIAL_ROWS
    the pool does not run POOL_GAIN times as fast as one thread: then batches get a
    session of one thread, and a lone caller keeps the pool (served alone on the event
    loop, one image comes back sooner from the pool: docs/results.md)."""
    pooled = make(threads)
    if threads != 0:
        return pooled, pooled
    one_image_s = run_s(pooled, 1)
    if one_image_s is None or one_image_s >= SMALL_MODEL_S:
        return pooled, pooled
    pooled_s = run_s(pooled, TRIAL_ROWS)
    single = make(1)
    single_s = run_s(single, TRIAL_ROWS)
    if pooled_s is None or single_s is None or single_s >= POOL_GAIN * pooled_s:
        return pooled, pooled
    return single, pooled


def run_s(session: ort.InferenceSession, rows: int) -> float | None:
    """The fastest of a few runs on `rows` images of zeros (after one untimed run); None
    where no input can be made up (a shape past the first dimension that is not fixed,
    a type that is not a plain number) or the model refuses zeros. A model with a fixed
    first dimension is run on that many."""
    feeds = {}
    for spec in session.get_inputs():
        dtype = _DTYPES.get(spec.type)
        if dtype is None or not spec.shape or not all(isinstance(d, int) for d in spec.shape[1:]):
            return None
        lead = spec.shape[0] if isinstance(spec.shape[0], int) else rows
        feeds[spec.name] = np.zeros((lead, *spec.shape[1:]), dtype)
    fastest = float("inf")
    try:
        session.run(None, feeds)
        for _ in range(_TIMED_RUNS):
            started = time.perf_counter()
            session.run(None, feeds)
            fastest = min(fastest, time.perf_counter() - started)
    except Exception:  # noqa: BLE001 - the model's own errors are for its requests to show
        return None
    return fastest
