"""The line a server program prints on stdout once it accepts calls; launchers wait for it.

Its own module, importing nothing, so a launcher in a test process does not load the
server's protocol stubs (which would clash with tritonclient's in one descriptor pool).
"""

from __future__ import annotations

import re

READY = re.compile(r"^(?P<program>\S+) ready on (?P<host>\S+):(?P<port>\d+)$")


def ready_line(program: str, host: str, port: int) -> str:
    return f"{program} ready on {host}:{port}"
