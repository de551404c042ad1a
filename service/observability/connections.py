"""How many client connections the gRPC port holds: gRPC does not tell the application,
the kernel does."""

from __future__ import annotations

import asyncio
import contextlib

import psutil
from prometheus_client import Gauge


def established(process: psutil.Process, port: int) -> int:
    return sum(1 for c in process.net_connections("tcp")
               if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED)


async def count_connections(port: int, gauge: Gauge, interval_s: float = 2.0) -> None:
    """Keep `gauge` at the number of connections open to `port`, refreshed every interval."""
    process = psutil.Process()
    while True:
        with contextlib.suppress(psutil.Error):  # the gauge keeps its last value
            gauge.set(await asyncio.to_thread(established, process, port))
        await asyncio.sleep(interval_s)
