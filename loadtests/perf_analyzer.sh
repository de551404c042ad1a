#!/bin/sh
# perf_analyzer from `make perf-analyzer`'s venv, with the CUDA runtime library it links
# against on LD_LIBRARY_PATH (no GPU needed). Arguments go to perf_analyzer unchanged.
venv="$(cd "$(dirname "$0")/.." && pwd)/.venv-perf-analyzer"
if [ ! -x "$venv/bin/perf_analyzer" ]; then
    echo "perf_analyzer is not installed: run 'make perf-analyzer'" >&2
    exit 127
fi
lib=$(echo "$venv"/lib/python3*/site-packages/nvidia/cuda_runtime/lib)
LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$venv/bin/perf_analyzer" "$@"
