"""Benchmark results -> a Markdown summary and PNG plots; reads Locust's CSV statistics."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from pydantic import BaseModel

from contract.table import format_table


def row_name(call: str, model: str, images_per_request: int) -> str:
    """A Locust row's name: the call, the model and the images each request carries
    (`ModelInfer lenet x1`), so runs against other models or sizes are told apart."""
    return f"{call} {model} x{images_per_request}"


class LocustStats(BaseModel):
    """One row of Locust's `<prefix>_stats.csv`."""

    name: str
    requests: int
    failures: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float


class ScenarioResult(BaseModel):
    scenario: str
    model: str
    api: str
    users: int
    images_per_request: int
    batching: bool
    stats: LocustStats
    batch_sizes: dict[str, float] = {}
    """Executed batches by batch-size bucket (`le` bound -> count), scraped from the server."""
    client: str = "locust"
    server_cpu_us: float | None = None
    """Server CPU time (its process tree) per request, where the client measured it."""
    client_cpu_us: float | None = None
    """The load generator's CPU time per request, where it was measured."""
    host_cores: int | None = None
    """Cores of the host that ran both, for the CPU-bound ceiling."""

    @property
    def cpu_bound_rps(self) -> float | None:
        """Requests a second that server and client together could reach with every core
        of the host busy: no server can beat it with the same client on the same host."""
        if self.server_cpu_us is None or self.client_cpu_us is None or not self.host_cores:
            return None
        return self.host_cores * 1e6 / (self.server_cpu_us + self.client_cpu_us)

    @property
    def images_per_s(self) -> float:
        """Images answered successfully per second."""
        ok_share = 1 - self.stats.failures / max(self.stats.requests, 1)
        return self.stats.rps * ok_share * self.images_per_request


class Reference(BaseModel):
    """onnxruntime called in-process: the ceiling the server can approach."""

    model: str
    batch_size: int
    images_per_s: float


def read_locust_stats(path: Path, name: str) -> LocustStats:
    """The row called `name` (`row_name(...)`, or "Aggregated") of a Locust stats CSV."""
    with open(path, newline="") as f:
        row = next((r for r in csv.DictReader(f) if r["Name"] == name), None)
    if row is None:
        raise ValueError(f"{path}: no row named {name!r}")

    def pct(key: str) -> float:
        return float(row[key]) if row[key] not in ("N/A", "") else float("nan")

    return LocustStats(name=name, requests=int(row["Request Count"]),
                       failures=int(row["Failure Count"]), rps=float(row["Requests/s"]),
                       p50_ms=pct("50%"), p95_ms=pct("95%"), p99_ms=pct("99%"))


def results_table(results: list[ScenarioResult]) -> str:
    """One row per scenario; the CPU columns only when some scenario measured CPU (Locust
    alone, as in the demo's quick run, measures none)."""
    header = ["scenario", "model", "api", "users", "img/req", "batching", "req/s", "img/s",
              "p50 ms", "p95 ms", "p99 ms", "errors", "client"]
    rows = [[r.scenario, r.model, r.api, str(r.users), str(r.images_per_request),
             "on" if r.batching else "off", f"{r.stats.rps:.0f}", f"{r.images_per_s:.0f}",
             _ms(r.stats.p50_ms), _ms(r.stats.p95_ms), _ms(r.stats.p99_ms),
             str(r.stats.failures), r.client] for r in results]
    if any(r.server_cpu_us is not None for r in results):
        header += ["server CPU us/req", "client CPU us/req", "of CPU-bound req/s"]
        for row, r in zip(rows, results, strict=True):
            bound = r.cpu_bound_rps
            row += [us_cell(r.server_cpu_us), us_cell(r.client_cpu_us),
                    "" if bound is None else f"{r.stats.rps / bound:.2f}"]
    return format_table(header, rows)


def us_cell(value: float | None) -> str:
    """Microseconds for a table cell; empty where not measured."""
    return "" if value is None or math.isnan(value) else f"{value:.0f}"


def _ms(value: float) -> str:
    """Milliseconds: to 0.01 below 10 ms (perf_analyzer's sub-millisecond p50s)."""
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def _plot_latency_vs_throughput(results: list[ScenarioResult], path: Path) -> bool:
    import matplotlib.pyplot as plt

    sweeps = {model: sorted((r for r in results if r.model == model and r.batching
                             and r.images_per_request == 1 and r.api == "oip"),
                            key=lambda r: r.users) for model in sorted({r.model for r in results})}
    sweeps = {m: s for m, s in sweeps.items() if len(s) >= 2}
    if not sweeps:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model, sweep in sweeps.items():
        for attr, style in (("p50_ms", "-o"), ("p95_ms", "--s"), ("p99_ms", ":^")):
            ax.plot([r.images_per_s for r in sweep], [getattr(r.stats, attr) for r in sweep],
                    style, label=f"{model} {attr[:3]}")
    ax.set(xlabel="images/s served", ylabel="latency (ms)",
           title="Latency percentiles vs throughput (concurrency sweep)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _plot_batching(results: list[ScenarioResult], path: Path) -> bool:
    import matplotlib.pyplot as plt

    pairs = []
    for on in (r for r in results if r.batching and r.scenario.startswith("batching")):
        off = next((r for r in results if not r.batching and r.model == on.model
                    and r.users == on.users and r.api == on.api), None)
        if off is not None:
            pairs.append((on, off))
    if not pairs:
        return False
    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(10, 4))
    labels = [on.model for on, _ in pairs]
    xs = range(len(pairs))
    ax_t.bar([x - 0.2 for x in xs], [on.images_per_s for on, _ in pairs], 0.4, label="on")
    ax_t.bar([x + 0.2 for x in xs], [off.images_per_s for _, off in pairs], 0.4, label="off")
    ax_l.bar([x - 0.2 for x in xs], [on.stats.p95_ms for on, _ in pairs], 0.4, label="on")
    ax_l.bar([x + 0.2 for x in xs], [off.stats.p95_ms for _, off in pairs], 0.4, label="off")
    for ax, title in ((ax_t, "images/s"), (ax_l, "p95 latency (ms)")):
        ax.set_xticks(list(xs), labels)
        ax.set_title(f"Batching on vs off: {title}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def batch_label(result: ScenarioResult) -> str:
    """A batch-size bar's legend: the scenario, named by its model where it does not say."""
    return result.scenario if result.model in result.scenario \
        else f"{result.model} {result.scenario}"


def _plot_batch_sizes(results: list[ScenarioResult], path: Path) -> bool:
    import matplotlib.pyplot as plt

    shown = [r for r in results if r.batch_sizes]
    if not shown:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.8 / max(len(shown), 1)
    for i, r in enumerate(shown):
        bounds = sorted(r.batch_sizes, key=float)
        ax.bar([k + i * width for k in range(len(bounds))], [r.batch_sizes[b] for b in bounds],
               width, label=batch_label(r))
        ax.set_xticks(range(len(bounds)), [f"≤{float(b):g}" for b in bounds])
    ax.set(xlabel="images per executed batch", ylabel="batches",
           title="Batch-size distribution (server metrics)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(out: Path, results: list[ScenarioResult], references: list[Reference],
                 ratios: list[tuple[str, float, str]], notes: list[str]) -> Path:
    """summary.md (tables, ratios against targets) and the PNG plots; returns summary.md."""
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    plots = [name for name, draw in (("latency_vs_throughput.png", _plot_latency_vs_throughput),
                                     ("batching_on_off.png", _plot_batching),
                                     ("batch_sizes.png", _plot_batch_sizes))
             if draw(results, out / name)]
    ref_table = format_table(("model", "batch", "img/s in-process"), [
        [r.model, str(r.batch_size), f"{r.images_per_s:.0f}"] for r in references])
    ratio_table = format_table(("ratio", "measured", "target"), [
        [name, f"{value:.2f}", target] for name, value, target in ratios])
    lines = ["# cnnserve benchmark", "", *notes, "", "## Scenarios", "", "```",
             results_table(results), "```", "", "## onnxruntime in-process (reference)", "",
             "```", ref_table, "```", "", "## Ratios (measured in this run)", "", "```",
             ratio_table, "```", "", *(f"![{p}]({p})" for p in plots), ""]
    summary = out / "summary.md"
    summary.write_text("\n".join(lines))
    (out / "results.json").write_text("[" + ",\n".join(r.model_dump_json() for r in results)
                                      + "]\n")
    return summary
