"""The engine: models and versions, batching policy and the batcher, onnxruntime, model control."""
