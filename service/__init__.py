"""The inference service: `frontends/` translate protocols, `core.py` admits, batches, runs
and records, `engine/` holds the models, batchers and onnxruntime sessions
(docs/architecture.md draws the path)."""
