"""`python -m loadtests.soak`: a bounded soak or overload run that reports memory and drift.

Soak: steady Locust load for `--minutes`; the server's RSS is sampled every second and
Locust's rolling percentiles are kept, so the report shows memory growth and latency
drift between the start and the end of the run. Overload (`--overload`): many more users
than a small queue admits; the report shows how much was refused (RESOURCE_EXHAUSTED),
the latency of what was accepted, and peak RSS. Nothing here is asserted: it reports.
"""

from __future__ import annotations

import argparse
import csv
import re
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from contract.table import format_table
from loadtests.bench import Scenario, run_locust
from loadtests.launch import free_port, launched
from loadtests.report import read_locust_stats, row_name


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"/proc/{pid}/status has no {field}")


def sample_rss(pid: int, stop: threading.Event, samples: list[tuple[float, float]],
               interval_s: float = 1.0) -> None:
    started = time.monotonic()
    while not stop.wait(interval_s):
        try:
            samples.append((time.monotonic() - started, rss_mib(pid)))
        except (OSError, ValueError):
            return


def failures_by_code(path: Path) -> Counter[str]:
    """Locust's failures CSV -> occurrences per gRPC status code."""
    counts: Counter[str] = Counter()
    if path.is_file():
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                match = re.search(r"\b([A-Z_]{5,}):", row["Error"])
                counts[match.group(1) if match else row["Error"][:40]] += int(row["Occurrences"])
    return counts


def latency_windows(path: Path) -> list[tuple[float, float, float]]:
    """(seconds since start, rolling p50 ms, rolling p95 ms) from Locust's history CSV."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row["Name"] == "Aggregated" and row["50%"] not in ("N/A", "", "0"):
                rows.append((int(row["Timestamp"]), float(row["50%"]), float(row["95%"])))
    if not rows:
        return []
    start = rows[0][0]
    return [(t - start, p50, p95) for t, p50, p95 in rows]


def _edges(values: Sequence[float]) -> tuple[float, float]:
    """Median of the first and of the last fifth of a series (skips warm-up noise)."""
    n = max(len(values) // 5, 1)
    return statistics.median(values[:n]), statistics.median(values[-n:])


def _plot(rss: list[tuple[float, float]], latency: list[tuple[float, float, float]],
          path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot([t for t, _ in rss], [m for _, m in rss])
    top.set_ylabel("server RSS (MiB)")
    bottom.plot([t for t, _, _ in latency], [p for _, p, _ in latency], label="p50")
    bottom.plot([t for t, _, _ in latency], [p for _, _, p in latency], label="p95")
    bottom.set_ylabel("latency (ms, rolling)")
    bottom.set_xlabel("seconds")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.soak", description=__doc__)
    p.add_argument("--repo", type=Path, default=Path("runs/demo/model_repository"))
    p.add_argument("--out", type=Path, default=Path("reports"))
    p.add_argument("--model", default="lenet")
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--users", type=int, default=None,
                   help="default: 16 for a soak, 256 with --overload")
    p.add_argument("--overload", action="store_true",
                   help="far more users than a small queue (--queue-size) admits")
    p.add_argument("--queue-size", type=int, default=16, help="server queue with --overload")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    args = p.parse_args(argv)

    users = args.users or (256 if args.overload else 16)
    kind = "overload" if args.overload else "soak"
    out = args.out / f"{datetime.now():%Y%m%d-%H%M%S}-{kind}"
    out.mkdir(parents=True)
    seconds = args.minutes * 60
    serve = [sys.executable, "-m", "service", "--repo", str(args.repo), "--port", "0",
             "--metrics-port", str(free_port()), "--probe-port", str(free_port()),
             "--http-port", "0", "--device", args.device,
             *(["--max-queue-size", str(args.queue_size)] if args.overload else [])]
    scenario = Scenario(kind, args.model, "oip", users, 1, True)
    prefix = out / scenario.slug
    print(f"{kind}: {users} users on {args.model} for {seconds:g}s; report in {out}",
          flush=True)
    samples: list[tuple[float, float]] = []
    with launched(serve) as server:
        stop = threading.Event()
        sampler = threading.Thread(target=sample_rss, args=(server.proc.pid, stop, samples))
        sampler.start()
        try:
            run_locust(f"127.0.0.1:{server.port}", scenario, seconds, prefix,
                       extra=["--csv-full-history",  # refusals are the point of overload
                              *(["--exit-code-on-error", "0"] if args.overload else [])])
            peak = rss_mib(server.proc.pid, "VmHWM")
        finally:
            stop.set()
            sampler.join()

    stats = read_locust_stats(Path(f"{prefix}_stats.csv"),
                              row_name("ModelInfer", args.model, 1))
    codes = failures_by_code(Path(f"{prefix}_failures.csv"))
    latency = latency_windows(Path(f"{prefix}_stats_history.csv"))
    with open(out / "rss.csv", "w", newline="") as f:
        csv.writer(f).writerows([("seconds", "rss_mib"), *samples])
    rows = [["requests", str(stats.requests)], ["req/s", f"{stats.rps:.0f}"],
            ["answered OK", str(stats.requests - stats.failures)]]
    rows += [[f"failed {code}", str(n)] for code, n in codes.most_common()]
    rows += [["p50 / p95 / p99 ms (whole run)",
              f"{stats.p50_ms:.0f} / {stats.p95_ms:.0f} / {stats.p99_ms:.0f}"]]
    if samples:
        first, last = _edges([m for _, m in samples])
        rows += [["RSS MiB start -> end", f"{first:.0f} -> {last:.0f} ({last - first:+.0f})"],
                 ["RSS MiB peak (VmHWM)", f"{peak:.0f}"]]
    if latency:
        p50 = _edges([p for _, p, _ in latency])
        p95 = _edges([p for _, _, p in latency])
        rows += [["rolling p50 ms start -> end", f"{p50[0]:.0f} -> {p50[1]:.0f}"],
                 ["rolling p95 ms start -> end", f"{p95[0]:.0f} -> {p95[1]:.0f}"]]
        _plot(samples, latency, out / "soak.png")
    table = format_table(("measure", "value"), rows)
    (out / "summary.md").write_text(
        f"# {kind}: {args.model}, {users} users, {seconds:g}s, device {args.device}\n\n"
        f"```\n{table}\n```\n\nRSS sampled every second (rss.csv); latency is Locust's "
        f"rolling window ({prefix.name}_stats_history.csv). Start and end are the medians "
        f"of the first and last fifth of the run.\n")
    print(table)
    print(f"report: {out / 'summary.md'}")
    unexpected = sum(n for code, n in codes.items() if code != "RESOURCE_EXHAUSTED")
    return 0 if unexpected == 0 and (args.overload or not codes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
