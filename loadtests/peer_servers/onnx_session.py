"""The onnxruntime session every peer serves with: the service's own options."""

from __future__ import annotations

import onnxruntime as ort

from service.engine.threads import fitted_session


def session(path: str, intra_op_threads: int, inter_op_threads: int) -> ort.InferenceSession:
    """CPU session with the service's defaults: full graph optimisation, no spinning
    (spinning threads take the cores the transport needs on a small host), and for
    `intra_op_threads` 0 the thread count the service would choose for the model."""
    def make(threads: int) -> ort.InferenceSession:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = inter_op_threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

    pooled = make(intra_op_threads)
    return pooled if intra_op_threads else fitted_session(pooled, lambda: make(1))[0]
