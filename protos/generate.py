"""Regenerate the Python stubs: `python -m protos.generate` (check with `--check`).

Runs grpcio-tools' protoc from the repository root, so the generated modules import
each other as `protos.*`. A test runs `--check`, which fails when a .proto changed
without its stubs being regenerated.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ("protos/model_config.proto", "protos/grpc_service.proto", "protos/classifier.proto")
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out: Path) -> list[Path]:
    """Write the stubs under `out/protos/`; returns the generated files."""
    out.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{ROOT}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", *(str(ROOT / p) for p in PROTOS)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return [out / p.removesuffix(".proto") for p in PROTOS]


def stub_names() -> list[str]:
    return [p.removesuffix(".proto") + suffix for p in PROTOS for suffix in SUFFIXES]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protos.generate", description=__doc__)
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if the committed stubs differ from freshly generated ones")
    args = parser.parse_args(argv)
    if not args.check:
        generate(ROOT)
        print("\n".join(stub_names()))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [name for name in stub_names()
                 if not (ROOT / name).is_file() or not filecmp.cmp(Path(tmp) / name, ROOT / name,
                                                                   shallow=False)]
    if stale:
        print(f"stale generated stubs: {', '.join(stale)}; run `python -m protos.generate`",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
