"""The onnxruntime session every peer serves with: the service's own options."""

from __future__ import annotations

import onnxruntime as ort


def session(path: str, intra_op_threads: int, inter_op_threads: int) -> ort.InferenceSession:
    """CPU session with the service's defaults: full graph optimisation, no spinning
    (spinning threads take the cores the transport needs on a small host)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = inter_op_threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
