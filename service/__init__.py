"""The inference service, top to bottom: `app/` (the process), `edge/` (admission at each
port), `frontends/` (protocol bindings), `core/` (one path for every request), `engine/`
(models, batchers, onnxruntime), with `memory/` and `observability/` beside them
(docs/architecture.md draws the path)."""

from importlib.metadata import PackageNotFoundError, version


def _installed_version() -> str:
    try:
        return version("cnnserve")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


__version__ = _installed_version()
