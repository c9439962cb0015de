"""The exporter process's own resources: prometheus_client's process, platform and GC
collectors (``process_*``, ``python_info``, ``python_gc_*``, names unchanged), and the
memory limit that ``process_resident_memory_bytes`` is compared with.

The limit is the memory limit of the exporter's cgroup (a container's, or a systemd
unit's ``MemoryMax``), read at scrape time so that a resized limit shows at once:
``binance_pm_exporter_memory_limit_bytes``, absent when there is none. The open-files
limit needs nothing of ours: ``process_max_fds`` is it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from exporter.safefile import UnsafeFileError, read_regular_file

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
#: cgroup v1 writes "no limit" as a huge number (PAGE_COUNTER_MAX pages); above this is none
NO_LIMIT_ABOVE = 1 << 62


def register_process_metrics(
    registry: CollectorRegistry,
    *,
    cgroup_root: Path = CGROUP_ROOT,
    proc_self_cgroup: Path = PROC_SELF_CGROUP,
) -> None:
    """Register the process, platform, GC and memory-limit collectors in `registry`."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(MemoryLimitCollector(memory_limit_file(cgroup_root, proc_self_cgroup)))


def memory_limit_file(cgroup_root: Path, proc_self_cgroup: Path) -> Path | None:
    """The file holding this process's cgroup memory limit: ``memory.max`` (cgroup v2) or
    ``memory.limit_in_bytes`` (v1) of the cgroup /proc/self/cgroup names, or of the root
    of the mount (a container's cgroup namespace shows its own cgroup as ``/``); None when
    neither exists."""
    try:
        lines = read_regular_file(proc_self_cgroup, 64 * 1024).decode("utf-8", "replace")
    except UnsafeFileError:
        return None
    candidates: list[Path] = []
    for line in lines.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        relative = path.lstrip("/")
        if hierarchy == "0" and controllers == "":
            for mount in (cgroup_root, cgroup_root / "unified"):
                candidates += [mount / relative / "memory.max", mount / "memory.max"]
        elif "memory" in controllers.split(","):
            mount = cgroup_root / "memory"
            candidates += [
                mount / relative / "memory.limit_in_bytes",
                mount / "memory.limit_in_bytes",
            ]
    return next((c for c in candidates if c.is_file()), None)


def read_memory_limit(path: Path | None) -> float | None:
    """The limit in bytes, or None for none (``max``, a huge v1 value, unreadable)."""
    if path is None:
        return None
    try:
        text = read_regular_file(path, 64).decode("ascii", "replace").strip()
    except UnsafeFileError:
        return None
    if not text.isdigit() or int(text) >= NO_LIMIT_ABOVE:
        return None
    return float(text)


class MemoryLimitCollector(Collector):
    """``binance_pm_exporter_memory_limit_bytes``, read from the cgroup at each scrape."""

    def __init__(self, path: Path | None) -> None:
        self._path = path

    def collect(self) -> Iterable[Metric]:
        limit = read_memory_limit(self._path)
        if limit is not None:
            yield GaugeMetricFamily(
                "binance_pm_exporter_memory_limit_bytes",
                "The memory limit of the exporter's cgroup (container or systemd unit), which "
                "process_resident_memory_bytes is compared with; absent when there is none.",
                value=limit,
            )
