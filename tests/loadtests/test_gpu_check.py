"""The prepared GPU check, proved on the CPU (`--dry-run`): every stage runs in a process
of its own, writes its JSON, and a stage with no time left is reported, not run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.servers import ROOT


def gpu_check(repo: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loadtests.gpu_check", "--dry-run",
                           "--repo", str(repo), "--out", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_the_dry_run_runs_every_stage_and_keeps_each_ones_figures(
        served_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(served_repo, repo)
    result = gpu_check(repo, tmp_path / "out")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert {s: v["outcome"] for s, v in summary["stages"].items()} == {
        s: "ok" for s in ("environment", "models", "tests", "in_process", "served", "loadgen",
                          "shared_memory")}
    environment = json.loads((tmp_path / "out" / "environment.json").read_text())
    assert environment["onnxruntime_distributions"] == ["onnxruntime-gpu"]
    assert json.loads((tmp_path / "out" / "models.json").read_text())["trained"] == []
    rows = json.loads((tmp_path / "out" / "in_process.json").read_text())["rows"]
    assert {(r["batch"], r["how"]) for r in rows} == {(b, h) for b in (1, 8)
                                                      for h in ("run", "iobinding")}
    served = json.loads((tmp_path / "out" / "served.json").read_text())["rows"]
    assert {(r["clients"], r["images_per_request"]) for r in served} == {(1, 1), (8, 1),
                                                                         (16, 32)}
    for row in served:
        assert row["errors"] == 0 and row["requests_per_s"] > 0
        assert row["execution_provider"] == "CPUExecutionProvider"
        assert row["model_file"] == "model.onnx"
        assert row["mean_batch"] >= 1 and row["p99_ms"] >= row["p50_ms"] > 0
    assert [r["mean_batch"] for r in served if r["images_per_request"] == 32] == [32.0]
    assert json.loads((tmp_path / "out" / "loadgen.json").read_text())["lenet"]["valid"]
    memory = json.loads((tmp_path / "out" / "shared_memory.json").read_text())
    assert memory["system"]["requests"] > 0
    assert "skipped" in memory["cuda"]


def test_stages_the_budget_cannot_hold_are_reported_not_run(tmp_path: Path) -> None:
    result = gpu_check(tmp_path / "repo", tmp_path / "out", "--stages", "environment",
                       "served", "--budget-s", "20")
    assert result.returncode == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["stages"]["environment"]["outcome"] == "not run: the budget was spent"
    assert summary["stages"]["served"]["outcome"] != "ok"
    assert not (tmp_path / "out" / "served.json").exists()
