"""ONNX Runtime's default thread count: the physical cores this process may run on, capped by
its container's CPU quota (cgroup v2 or v1)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenwire.server.config import Settings
from tokenwire.server.cpus import CpuBudget, cpu_budget
from tokenwire.server.main import load_engine

FOUR_CPUS_TWO_CORES = {0: ("0", "0"), 1: ("0", "0"), 2: ("0", "1"), 3: ("0", "1")}
"""cpu -> (package, core): two cores, each with two hardware threads."""


def _topology(root: Path, cpus: dict[int, tuple[str, str]]) -> Path:
    for cpu, (package, core) in cpus.items():
        folder = root / f"cpu{cpu}" / "topology"
        folder.mkdir(parents=True)
        (folder / "physical_package_id").write_text(f"{package}\n")
        (folder / "core_id").write_text(f"{core}\n")
    return root


def _cgroup(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def _budget(tmp_path: Path, cgroup: dict[str, str], allowed: set[int] | None = None) -> CpuBudget:
    topology = _topology(tmp_path / "cpu", FOUR_CPUS_TWO_CORES)
    return cpu_budget(_cgroup(tmp_path / "cgroup", cgroup), topology, allowed or {0, 1, 2, 3})


def test_without_a_quota_every_physical_core_computes_not_every_hardware_thread(
    tmp_path: Path,
) -> None:
    """Four CPUs that are two cores with two threads each, no quota (cgroup v2 `max`): two."""
    budget = _budget(tmp_path, {"cpu.max": "max 100000\n"})
    assert budget == CpuBudget(2, "physical cores")


def test_the_affinity_mask_limits_the_cores(tmp_path: Path) -> None:
    """Pinned to CPUs 0 and 1 (both threads of core 0): one."""
    assert _budget(tmp_path, {}, allowed={0, 1}) == CpuBudget(1, "physical cores")


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "100000 100000\n"}, CpuBudget(1, "cgroup cpu.max")),
        ({"cpu.max": "150000 100000\n"}, CpuBudget(1, "cgroup cpu.max")),
        ({"cpu.max": "20000 100000\n"}, CpuBudget(1, "cgroup cpu.max")),
        (
            {"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"},
            CpuBudget(1, "cgroup cpu.cfs_quota_us"),
        ),
        (
            {"cpu,cpuacct/cpu.cfs_quota_us": "50000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000"},
            CpuBudget(1, "cgroup cpu.cfs_quota_us"),
        ),
    ],
)
def test_a_cpu_quota_below_the_cores_sets_the_threads_in_whole_cpus(
    tmp_path: Path, files: dict[str, str], expected: CpuBudget
) -> None:
    """A quota of 1, 1.5 or 0.2 CPUs (cgroup v2 cpu.max, or v1 under `cpu` or `cpu,cpuacct`)
    gives one thread: whole CPUs, rounded down, at least one."""
    assert _budget(tmp_path, files) == expected


@pytest.mark.parametrize(
    "files",
    [
        {"cpu.max": "800000 100000\n"},
        {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"},
        {"cpu.max": "lots of cpus\n"},
        {"cpu/cpu.cfs_quota_us": "many\n", "cpu/cpu.cfs_period_us": "100000\n"},
    ],
)
def test_a_quota_above_the_cores_none_or_an_unreadable_one_leaves_the_cores(
    tmp_path: Path, files: dict[str, str]
) -> None:
    """8 CPUs of quota on two cores, v1's -1 (no quota) and unparsable files: the two cores."""
    assert _budget(tmp_path, files) == CpuBudget(2, "physical cores")


def test_without_a_topology_the_allowed_cpus_count(tmp_path: Path) -> None:
    """Where no topology can be read, each allowed CPU counts as a core."""
    budget = cpu_budget(_cgroup(tmp_path / "cgroup", {}), tmp_path / "none", {0, 1, 2})
    assert budget == CpuBudget(3, "cpus")


def test_the_server_runs_onnx_runtime_with_the_budget_or_the_setting() -> None:
    """With intra_op_threads 0 the model's session computes with this process's budget; a
    setting of 1 gives one thread."""
    for setting, expected in ((0, cpu_budget().cpus), (1, 1)):
        engine = load_engine(Settings(intra_op_threads=setting))
        session = engine.model.session
        assert session.get_session_options().intra_op_num_threads == expected
