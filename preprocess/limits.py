"""The budgets a case must fit: memory (checked from the header, before a voxel is decoded) and time.

Defaults follow Grand Challenge's algorithm jobs (grand-challenge.org settings and models):
`ALGORITHMS_JOB_DEFAULT_TIME_LIMIT_SECONDS = 3600` (jobs may be given 300 s to 24 h) and
`Algorithm.job_requires_memory_gb = 8` (4 to 32 GB). Here the memory budget is the container's cgroup
limit when it has one, else the machine's physical memory; `--memory-limit-gb` overrides it.

The peak-memory model, `PEAK_FIXED_BYTES + voxels * (PEAK_BYTES_PER_VOXEL + stored bytes per voxel)`,
is fitted to process.py's measured peak RSS by benchmarks/bench_memory.py (512x512x300 and x1000).
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from common.errors import MemoryBudgetError, TimeBudgetError

GC_DEFAULT_JOB_TIME_LIMIT_S = 3600
GC_DEFAULT_JOB_MEMORY_GB = 8
#: a case may use the job's default time limit less 5 minutes for start-up, model loading and results
DEFAULT_CASE_TIME_LIMIT_S = GC_DEFAULT_JOB_TIME_LIMIT_S - 300
#: after the soft limit, how long a case stuck inside native code (no Python bytecode runs, so no
#: exception can be raised) gets before the process reports it and exits
HARD_LIMIT_GRACE_S = 60.0

# Measured (benchmarks/bench_memory.py, docs/benchmarks.md; OpenVINO, int16 .mha): peak = 923 MiB + 3.0
# bytes/voxel (stored 2 included); runtime, model and the streamed logits chunks are the fixed part, the CT
# and its label map grow with the voxels. Set with a margin (x2.7 on the slope) for the per-case reports
# (DICOM-SEG frames) and for changes in the pipeline: an earlier pipeline, whose measures held float64
# copies of the volume, peaked at 0.7 GiB + 18.5 bytes/voxel.
PEAK_FIXED_BYTES = 1024 * 2**20
PEAK_BYTES_PER_VOXEL = 6

_CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def estimate_peak_bytes(size_xyz: tuple[int, ...], *, stored_bytes_per_voxel: int) -> int:
    """process.py's peak memory for one case of this size whose file stores `stored_bytes_per_voxel`."""
    voxels = 1
    for n in size_xyz:
        voxels *= int(n)
    return PEAK_FIXED_BYTES + voxels * (PEAK_BYTES_PER_VOXEL + stored_bytes_per_voxel)


def detect_memory_limit() -> tuple[int, str]:
    """(bytes, where the number came from): the cgroup limit of this container, else physical memory."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in _CGROUP_LIMITS:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < physical:
            return int(text), f"the container's memory limit ({path})"
    return physical, "the machine's physical memory"


@dataclass(frozen=True)
class MemoryBudget:
    limit_bytes: int
    origin: str  # where the limit came from, for the message

    def check(self, size_xyz: tuple[int, ...], *, stored_bytes_per_voxel: int, source: Path) -> None:
        """Refuse a volume whose estimated peak exceeds the budget, naming its size."""
        need = estimate_peak_bytes(size_xyz, stored_bytes_per_voxel=stored_bytes_per_voxel)
        if need > self.limit_bytes:
            voxels = 1
            for n in size_xyz:
                voxels *= int(n)
            raise MemoryBudgetError(
                f"{source}: {'x'.join(str(int(n)) for n in size_xyz)} voxels ({voxels / 1e6:.0f} M) would need about "
                f"{need / 2**30:.1f} GiB, more than the {self.limit_bytes / 2**30:.1f} GiB budget of {self.origin}; "
                f"refused before reading (raise --memory-limit-gb or crop the volume)"
            )


class CaseTimer:
    """Stop a case that runs past `seconds`.

    Soft limit: SIGALRM (main thread only) raises TimeBudgetError wherever Python code runs next, so the
    case unwinds through its own cleanup and writes nothing. Hard limit: a case stuck in native code for
    `grace_s` more is reported by `on_hard_timeout` (which must log and clean up) and the process exits
    with TimeBudgetError's code, since a thread cannot be interrupted there.
    """

    def __init__(self, seconds: float | None, *, case: str, on_hard_timeout: Callable[[str], None] | None = None,
                 grace_s: float | None = None):
        self.seconds = seconds
        self.case = case
        self.on_hard_timeout = on_hard_timeout
        self.grace_s = HARD_LIMIT_GRACE_S if grace_s is None else grace_s
        self._previous = None
        self._watchdog: threading.Timer | None = None

    def message(self) -> str:
        return f"{self.case}: stopped after the time budget of {self.seconds:g} s per case (--time-limit-s)"

    def _on_alarm(self, signum, frame):
        raise TimeBudgetError(self.message())

    def _on_hard_timeout(self) -> None:
        message = f"{self.message()}; it did not stop within {self.grace_s:g} s more (stuck in native code), exiting"
        try:
            if self.on_hard_timeout is not None:
                self.on_hard_timeout(message)
        finally:  # whatever the report did (a full disk), the process must not hang on
            os._exit(TimeBudgetError.exit_code)

    def __enter__(self) -> "CaseTimer":
        if not self.seconds or self.seconds <= 0:
            return self
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGALRM, self._on_alarm)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
        self._watchdog = threading.Timer(self.seconds + self.grace_s, self._on_hard_timeout)
        self._watchdog.daemon = True
        self._watchdog.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._previous is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous)
            self._previous = None


def memory_budget(limit_gb: float | None) -> MemoryBudget:
    if limit_gb is not None:
        return MemoryBudget(int(limit_gb * 2**30), "--memory-limit-gb")
    return MemoryBudget(*detect_memory_limit())


@dataclass(frozen=True)
class CpuGrant:
    """How many CPU threads the scheduler grants this process, and which limit decided it."""

    count: int
    origin: str


def _read_cgroup_quota(cgroup_root: Path, proc_cgroup: str) -> tuple[float, Path] | None:
    """The tightest CPU quota (cores, and its cpu.max / cpu.cfs_quota_us file) on this process's cgroup path, v2 or v1."""
    tightest = None
    for line in proc_cgroup.splitlines():
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and controllers == "":  # cgroup v2: <root>/<path>/cpu.max, and every parent's
            base = cgroup_root
        elif "cpu" in controllers.split(","):  # cgroup v1: the cpu controller's own hierarchy
            base = next((cgroup_root / name for name in ("cpu,cpuacct", "cpu") if (cgroup_root / name).is_dir()), None)
            if base is None:
                continue
        else:
            continue
        parts = [p for p in path.strip().split("/") if p]
        for depth in range(len(parts), -1, -1):  # in a container, its own cgroup is the namespace's root
            folder = base.joinpath(*parts[:depth])
            cores = _read_quota(folder)
            if cores is not None and (tightest is None or cores[0] < tightest[0]):
                tightest = cores
    return tightest


def _read_quota(folder: Path) -> tuple[float, Path] | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
        if quota != "max":
            return int(quota) / int(period), folder / "cpu.max"
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return (quota / period, folder / "cpu.cfs_quota_us") if quota > 0 and period > 0 else None


def detect_granted_cpus(environ=os.environ, *, cgroup_root: Path = Path("/sys/fs/cgroup"), proc_cgroup: str | None = None) -> CpuGrant:
    """The CPUs this process may use, never more than any of: the CPUs it may run on (cpuset: sched_getaffinity;
    Slurm's task/affinity and Docker's --cpuset-cpus set it), the cgroup CPU quota rounded down, at least 1
    (Docker's --cpus, Kubernetes' CPU limit, Slurm's cgroup plugin), and SLURM_CPUS_PER_TASK (Slurm without
    cgroups grants CPUs only on paper). More threads than the quota only queue for it: a thread that waits for
    its slice stalls every thread that syncs with it."""
    if hasattr(os, "sched_getaffinity"):  # Linux; macOS and Windows have no affinity mask to read
        candidates = [(len(os.sched_getaffinity(0)), "the CPUs this process may run on (sched_getaffinity)")]
    else:
        candidates = [(os.cpu_count() or 1, "the CPUs of this machine (os.cpu_count: no affinity mask on this OS)")]
    if proc_cgroup is None:
        try:
            proc_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            proc_cgroup = ""
    quota = _read_cgroup_quota(cgroup_root, proc_cgroup)
    if quota is not None:
        candidates.append((max(1, int(quota[0] + 1e-9)), f"the cgroup CPU quota of {quota[0]:g} cores ({quota[1]})"))
    text = environ.get("SLURM_CPUS_PER_TASK", "").strip()
    if text.isdigit() and int(text) > 0:
        candidates.append((int(text), f"SLURM_CPUS_PER_TASK={text}"))
    count, origin = min(candidates, key=lambda c: c[0])
    return CpuGrant(count, origin)
