"""`python -m loadtests.profiled OUT MODULE [ARGS...]`: run a server module as `python -m
MODULE ARGS...` with cProfile on its main thread switched by signals, so that a benchmark
can count the Python calls a window of requests costs (`loadtests.calls`).

SIGUSR1 clears the profile and starts it, then creates `OUT.on`; SIGUSR2 stops it and
writes the stats to OUT (pstats format), then creates `OUT.done`. The main thread is the
one that runs the event loop: every front-end, the edge, the core and the batcher run
there; onnxruntime's threads, the compute pool and the image decoders do not.
"""

from __future__ import annotations

import cProfile
import runpy
import signal
import sys
from pathlib import Path
from types import FrameType


def main() -> None:
    out, module, *args = sys.argv[1:]
    profile = cProfile.Profile()

    def start(signum: int, frame: FrameType | None) -> None:
        profile.clear()
        profile.enable()
        Path(out + ".on").touch()

    def stop(signum: int, frame: FrameType | None) -> None:
        profile.disable()
        profile.dump_stats(out)
        Path(out + ".done").touch()

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
