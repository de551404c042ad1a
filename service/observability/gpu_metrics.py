"""GPU utilisation, memory and power per device, read from NVML at each scrape, as
Triton's `nv_gpu_*` metrics are. Absent where no NVIDIA driver answers (no series at all,
so dashboards show no GPU rather than a GPU at zero)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


class GpuCollector(Collector):
    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml
        self.count = int(nvml.nvmlDeviceGetCount())

    def collect(self) -> Iterator[Metric]:
        nvml, labels = self.nvml, ["gpu", "uuid"]
        util = GaugeMetricFamily("cnnserve_gpu_utilization_ratio",
                                 "Fraction of the last sample period the GPU was busy.",
                                 labels=labels)
        used = GaugeMetricFamily("cnnserve_gpu_memory_used_bytes", "GPU memory in use.",
                                 labels=labels)
        total = GaugeMetricFamily("cnnserve_gpu_memory_total_bytes", "GPU memory in all.",
                                  labels=labels)
        power = GaugeMetricFamily("cnnserve_gpu_power_watts", "GPU power draw.", labels=labels)
        for index in range(self.count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = nvml.nvmlDeviceGetUUID(handle)
                key = [str(index), uuid.decode() if isinstance(uuid, bytes) else str(uuid)]
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                used.add_metric(key, float(memory.used))
                total.add_metric(key, float(memory.total))
                util.add_metric(key, nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100)
                power.add_metric(key, nvml.nvmlDeviceGetPowerUsage(handle) / 1000)
            except nvml.NVMLError as exc:  # a device that fails one read keeps the others
                log.debug("NVML could not read GPU %d: %s", index, exc)
        yield from (util, used, total, power)


def register_gpu_metrics(registry: CollectorRegistry, nvml: Any = None) -> bool:
    """Export GPU metrics into `registry` if NVML finds a GPU; says whether it did."""
    try:
        if nvml is None:
            import pynvml

            nvml = pynvml
        nvml.nvmlInit()
        collector = GpuCollector(nvml)
    except Exception as exc:  # noqa: BLE001 - no library, no driver, no device: no GPU metrics
        log.debug("no GPU metrics: %s", exc)
        return False
    if collector.count == 0:
        return False
    registry.register(collector)
    return True


def process_gpu_memory_bytes(pid: int, nvml: Any = None) -> int | None:
    """GPU memory process `pid` holds, over every GPU (NVML); None where NVML cannot say,
    or does not list the process (a container's PIDs are not the host's)."""
    try:
        if nvml is None:
            import pynvml

            nvml = pynvml
        nvml.nvmlInit()
        found = [p.usedGpuMemory or 0
                 for index in range(int(nvml.nvmlDeviceGetCount()))
                 for p in nvml.nvmlDeviceGetComputeRunningProcesses(
                     nvml.nvmlDeviceGetHandleByIndex(index))
                 if p.pid == pid]
    except Exception as exc:  # noqa: BLE001 - no library, no driver: nothing to say
        log.debug("no GPU memory figure: %s", exc)
        return None
    return sum(found) if found else None
