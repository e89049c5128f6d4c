"""What this process's cgroups allow it: how many CPUs (the CPUs it may run on, capped by the CPU quota), and how
much memory.

A container started with `docker run --cpus 2`, or a Kubernetes pod with a CPU limit, still sees every CPU of the
node in its affinity mask; what holds it to 2 is the CFS quota of its cgroup. Workers and onnxruntime threads sized
by the node's CPUs (on a 64-CPU node: 4 workers × 16 threads, each worker with its own copy of every model) would
use up a period's quota within milliseconds and then be stopped until the next period, every period: throttling,
stalls of up to the period (100 ms by default) in every answer. Go's automaxprocs and the JVM count CPUs this way.

The quota is read from the kernel's own files: /proc/self/cgroup names this process's cgroups, /proc/self/mountinfo
where their hierarchies are mounted (inside a container with a cgroup namespace its cgroup is the mount's root;
without one, a path below it), and the tightest quota of the cgroup and its ancestors applies: cgroup v2's cpu.max
("max 100000" or "<quota> <period>"), cgroup v1's cpu.cfs_quota_us (-1: none) over cpu.cfs_period_us. The memory
limit is found the same way: v2's memory.max ("max" or bytes), v1's memory.limit_in_bytes (a number near 2^63: none);
serving/config.py fits the number of workers to it.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import Path

PROC_SELF = Path("/proc/self")
# Reads one cgroup's own limit from its folder, for cgroup "v1" or "v2": None where it sets none.
Reader = Callable[[Path, str], float | None]


def _unescape(field: str) -> str:
    """mountinfo writes a space, tab, newline or backslash in a path as an octal escape (\\040)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def cgroup_mounts(mountinfo: str, controller: str) -> dict[str, list[tuple[Path, str]]]:
    """(mount point, root of the hierarchy mounted there) of the cgroup v2 hierarchy ("v2") and of the cgroup v1
    hierarchy that has `controller` ("v1")."""
    mounts: dict[str, list[tuple[Path, str]]] = {"v1": [], "v2": []}
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        root, point = _unescape(fields[3]), Path(_unescape(fields[4]))
        if tail[0] == "cgroup2":
            mounts["v2"].append((point, root))
        elif tail[0] == "cgroup" and controller in tail[2].split(","):
            mounts["v1"].append((point, root))
    return mounts


def _cpu_quota(directory: Path, version: str) -> float | None:
    """The CPUs one cgroup's own quota allows, or None without one (or when its files can't be read)."""
    try:
        if version == "v2":
            quota, period = (directory / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota_us = int((directory / "cpu.cfs_quota_us").read_text())
        return None if quota_us < 0 else quota_us / int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError, ZeroDivisionError):
        return None


# cgroup v1 writes "no limit" as the largest multiple of the page size below 2^63.
NO_MEMORY_LIMIT = 1 << 62


def _memory_limit(directory: Path, version: str) -> float | None:
    """The bytes one cgroup's own memory limit allows, or None without one."""
    try:
        text = (directory / ("memory.max" if version == "v2" else "memory.limit_in_bytes")).read_text().strip()
        return None if text == "max" or int(text) >= NO_MEMORY_LIMIT else int(text)
    except (OSError, ValueError):
        return None


def _tightest(point: Path, root: str, path: str, version: str, read: Reader) -> float | None:
    """The tightest limit `read` finds on the way from the cgroup at `path` up to the top of its mounted hierarchy."""
    relative = os.path.relpath(path, root) if path == root or path.startswith(root.rstrip("/") + "/") else "."
    directory = point / relative
    limits = []
    while True:
        if (limit := read(directory, version)) is not None:
            limits.append(limit)
        if directory == point or point not in directory.parents:
            break
        directory = directory.parent
    return min(limits, default=None)


def _cgroup_limit(proc: Path, controller: str, read: Reader) -> float | None:
    """The tightest limit `read` finds over this process's cgroups of `controller` and their ancestors, v2 or v1."""
    try:
        cgroups = (proc / "cgroup").read_text()
        mounts = cgroup_mounts((proc / "mountinfo").read_text(), controller)
    except OSError:
        return None
    limits = []
    for line in cgroups.splitlines():
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and controllers == "":
            version = "v2"
        elif controller in controllers.split(","):
            version = "v1"
        else:
            continue
        for point, root in mounts[version]:
            if (limit := _tightest(point, root, path, version, read)) is not None:
                limits.append(limit)
    return min(limits, default=None)


def cgroup_cpu_quota(proc: Path = PROC_SELF) -> float | None:
    """The CPUs this process's cgroups allow it (e.g. 2.0, or 0.5), the tightest of their quotas and their
    ancestors'; None when none has a quota (or there are no cgroups to read: not Linux)."""
    return _cgroup_limit(proc, "cpu", _cpu_quota)


def cgroup_memory_limit(proc: Path = PROC_SELF) -> int | None:
    """The bytes of memory this process's cgroups allow it and everything else in them (`docker run --memory`, a
    pod's memory limit), the tightest of their limits and their ancestors'; None when none has one."""
    limit = _cgroup_limit(proc, "memory", _memory_limit)
    return None if limit is None else int(limit)


def affinity_cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def usable_cpus(proc: Path = PROC_SELF) -> int:
    """The CPUs to size workers and threads for: those this process may run on, no more than its cgroup quota allows
    (rounded down: a thread more than the quota is what throttles; at least 1)."""
    cpus = affinity_cpus()
    quota = cgroup_cpu_quota(proc)
    return cpus if quota is None else max(1, min(cpus, math.floor(quota + 1e-9)))
