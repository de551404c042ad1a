"""The line a server program prints on stdout once it accepts calls; launchers wait for it.

Its own module, importing nothing, so a launcher in a test process does not load the
server's protocol stubs (which would clash with tritonclient's in one descriptor pool).
"""

from __future__ import annotations

import os
import re
import sys

READY = re.compile(r"^(?P<program>\S+) (?:ready|listening) on (?P<host>\S+):(?P<port>\d+)"
                   r"(?:, not ready: .*)?$")
"""Either line: launchers want the port; whether it is ready is for its probes to say."""


def ready_line(program: str, host: str, port: int, unready: str = "") -> str:
    """`unready`: what keeps it from being ready (models that could not be served)."""
    if unready:
        return f"{program} listening on {host}:{port}, not ready: {unready}"
    return f"{program} ready on {host}:{port}"


def announce(line: str) -> None:
    """Print `line` on a line of its own, in one write (whole, on a pipe): for a server
    whose child logs to the same pipe (Triton's under pytriton), which may be mid-line;
    print() writes the newline separately, and a launcher missed a line split so."""
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), f"\n{line}\n".encode())
