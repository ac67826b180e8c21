"""How many threads ONNX Runtime should compute with: the cores this process may really use.

Left to itself, ONNX Runtime starts one intra-op thread per physical core of the machine. In a
container that is often far more than the container may use: a Kubernetes CPU limit is a CFS
quota (cgroup `cpu.max`, or `cpu.cfs_quota_us` under cgroup v1), not a smaller machine, and a
pinned cpuset (the kubelet's static CPU manager, `taskset`) is an affinity mask ONNX Runtime
does not read either. Thirty-two threads that wait at every operator for each other on four
CPUs' worth of quota spend most of each step throttled. So the default thread count is the
physical cores among the CPUs this process may run on, capped by the CPU quota (rounded down,
at least one), as Go's automaxprocs and the JVM's container support do.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")
CPUS = Path("/sys/devices/system/cpu")


@dataclasses.dataclass(frozen=True, slots=True)
class CpuBudget:
    """Threads to compute with, and what set the number."""

    cpus: int
    source: str
    """`cgroup cpu.max` or `cgroup cpu.cfs_quota_us` (a CPU quota), `physical cores` (those
    the affinity mask allows), or `cpus` (no topology to read: the affinity mask's CPUs)."""


def cpu_budget(
    cgroup: Path = CGROUP, topology: Path = CPUS, allowed: set[int] | None = None
) -> CpuBudget:
    """The budget of this process: its CPU quota, if set and smaller than the physical cores
    among the CPUs it may run on, else those cores."""
    if allowed is None:
        affinity = getattr(os, "sched_getaffinity", None)  # Linux; elsewhere every CPU
        allowed = set(affinity(0)) if affinity else set(range(os.cpu_count() or 1))
    cores = _physical_cores(topology, allowed)
    budget = CpuBudget(cores, "physical cores") if cores else CpuBudget(len(allowed), "cpus")
    quota = _quota(cgroup)
    if quota is not None and quota.cpus < budget.cpus:
        return quota
    return budget


def _physical_cores(topology: Path, allowed: set[int]) -> int:
    """Distinct (package, core) pairs among the allowed CPUs; 0 if any cannot be read."""
    cores = set()
    for cpu in allowed:
        folder = topology / f"cpu{cpu}" / "topology"
        try:
            package = (folder / "physical_package_id").read_text().strip()
            core = (folder / "core_id").read_text().strip()
        except OSError:
            return 0
        cores.add((package, core))
    return len(cores)


def _quota(cgroup: Path) -> CpuBudget | None:
    """The CPU quota in whole CPUs (at least 1), from cgroup v2 or v1; None if unlimited or
    unreadable."""
    try:
        fields = (cgroup / "cpu.max").read_text().split()
    except OSError:
        fields = []
    if fields:
        if fields[0] == "max" or len(fields) != 2:
            return None
        return _whole_cpus(fields[0], fields[1], "cgroup cpu.max")
    for controller in ("cpu", "cpu,cpuacct"):
        folder = cgroup / controller
        try:
            quota = (folder / "cpu.cfs_quota_us").read_text()
            period = (folder / "cpu.cfs_period_us").read_text()
        except OSError:
            continue
        return _whole_cpus(quota, period, "cgroup cpu.cfs_quota_us")
    return None


def _whole_cpus(quota: str, period: str, source: str) -> CpuBudget | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    if q <= 0 or p <= 0:  # -1: no quota (cgroup v1)
        return None
    return CpuBudget(max(1, q // p), source)
