"""GPU metrics from NVML: a fake NVML stands in for a driver (none here); the real
library, finding no GPU, must export nothing."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from service.observability.gpu_metrics import process_gpu_memory_bytes, register_gpu_metrics


class FakeNvml:
    class NVMLError(Exception):
        pass

    def __init__(self, count: int, broken: int | None = None) -> None:
        self.count, self.broken = count, broken

    def nvmlInit(self) -> None:  # noqa: N802 - NVML's names
        pass

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return self.count

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        if index == self.broken:
            raise self.NVMLError("GPU is lost")
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> str:  # noqa: N802
        return f"GPU-{handle}"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:  # noqa: N802
        return SimpleNamespace(used=(handle + 1) * 2**30, total=80 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:  # noqa: N802
        return SimpleNamespace(gpu=37)

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:  # noqa: N802
        return 312_500  # milliwatts

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[Any]:  # noqa: N802
        return [SimpleNamespace(pid=7, usedGpuMemory=(handle + 1) * 2**20),
                SimpleNamespace(pid=8, usedGpuMemory=None),
                SimpleNamespace(pid=9, usedGpuMemory=2**30)]


def test_each_gpu_exports_utilisation_memory_and_power_and_a_lost_one_is_skipped() -> None:
    registry = CollectorRegistry()
    assert register_gpu_metrics(registry, FakeNvml(count=3, broken=1))
    text = generate_latest(registry).decode()
    assert 'cnnserve_gpu_utilization_ratio{gpu="0",uuid="GPU-0"} 0.37' in text
    assert 'cnnserve_gpu_memory_used_bytes{gpu="2",uuid="GPU-2"} 3.221225472e+09' in text
    assert 'cnnserve_gpu_memory_total_bytes{gpu="0",uuid="GPU-0"} 8.589934592e+10' in text
    assert 'cnnserve_gpu_power_watts{gpu="2",uuid="GPU-2"} 312.5' in text
    assert 'gpu="1"' not in text


def test_without_a_gpu_nothing_is_exported() -> None:
    registry = CollectorRegistry()
    assert not register_gpu_metrics(registry, FakeNvml(count=0))
    assert "cnnserve_gpu" not in generate_latest(registry).decode()
    real = CollectorRegistry()
    if not register_gpu_metrics(real):  # the real NVML: here, no driver
        assert "cnnserve_gpu" not in generate_latest(real).decode()


def test_a_process_gpu_memory_is_summed_over_the_gpus_it_uses() -> None:
    assert process_gpu_memory_bytes(7, FakeNvml(count=2)) == 3 * 2**20
    assert process_gpu_memory_bytes(8, FakeNvml(count=2)) == 0  # listed, usage not known
    assert process_gpu_memory_bytes(6, FakeNvml(count=2)) is None  # not listed
    assert process_gpu_memory_bytes(7, FakeNvml(count=2, broken=1)) is None
