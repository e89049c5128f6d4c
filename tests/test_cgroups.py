"""What a process's cgroups allow it (serving/cgroups.py): the CPUs (its affinity, capped by the CPU quota), so that a
container given 1 CPU of a larger machine starts 1 worker of 1 onnxruntime thread, not one per CPU of the machine;
and the memory, so that it starts no more workers than its memory limit holds.

The first tests read cgroup trees laid out as the kernel lays them out (v2 and v1, inside a cgroup namespace and
outside one) under a temporary folder. The last ones make real cgroups on this machine (root and cgroup v1 cpu and
memory hierarchies, as this project's machines have) with a 1-CPU quota or a 1 GiB limit, and run a process, the
real server and the batch CLI in them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from serving.cgroups import affinity_cpus, cgroup_cpu_quota, cgroup_memory_limit, usable_cpus

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serverproc import (  # noqa: E402
    REPO_ROOT,
    cpu_quota_cgroup,
    join_cgroup,
    memory_limit_cgroup,
    server_log,
    started_server,
    worker_pids,
)


def fake_proc(tmp_path: Path, cgroup: str, mounts: list[str]) -> Path:
    """A /proc/self with these cgroup lines and mountinfo lines (`{root}` stands for tmp_path)."""
    proc = tmp_path / "proc-self"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup)
    (proc / "mountinfo").write_text("".join(m.format(root=tmp_path) + "\n" for m in mounts))
    return proc


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


SYSFS = "22 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw"


def test_cgroup_v2_in_a_container_reads_its_own_cpu_max(tmp_path):
    # docker run --cpus 2 on cgroup v2: a cgroup namespace, so the container's cgroup is "/" and the mount's root.
    proc = fake_proc(tmp_path, "0::/\n", [SYSFS, "30 22 0:26 / {root}/cg rw,nosuid - cgroup2 cgroup2 rw,nsdelegate"])
    write(tmp_path / "cg" / "cpu.max", "200000 100000\n")
    assert cgroup_cpu_quota(proc) == 2.0
    assert usable_cpus(proc) == min(2, affinity_cpus())


def test_cgroup_v2_takes_the_tightest_quota_of_the_cgroup_and_its_ancestors(tmp_path):
    # A Kubernetes pod's limit sits on the pod's cgroup; the container's own may say "max".
    proc = fake_proc(tmp_path, "0::/kubepods/pod1/ctr\n", ["30 22 0:26 / {root}/cg rw - cgroup2 cgroup2 rw"])
    write(tmp_path / "cg" / "cpu.max", "max 100000\n")
    write(tmp_path / "cg" / "kubepods" / "cpu.max", "max 100000\n")
    write(tmp_path / "cg" / "kubepods" / "pod1" / "cpu.max", "150000 100000\n")
    write(tmp_path / "cg" / "kubepods" / "pod1" / "ctr" / "cpu.max", "max 100000\n")
    assert cgroup_cpu_quota(proc) == 1.5
    assert usable_cpus(proc) == 1  # rounded down: a second thread would overrun the quota and be throttled


def test_cgroup_v1_without_a_namespace_finds_its_cgroup_below_the_mount(tmp_path):
    # cgroup v1 with the hierarchy's sub-tree bind-mounted (older Docker): the mount's root is the cgroup's path.
    mount = "{root}/cpu\\040and\\040acct"  # mountinfo escapes a space in a path as \040
    proc = fake_proc(tmp_path, "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n",
                     [f"35 31 0:32 /docker/abc {mount} rw,nosuid - cgroup cgroup rw,memory",
                      f"36 31 0:33 /docker/abc {mount} rw,nosuid - cgroup cgroup rw,cpu,cpuacct"])
    write(tmp_path / "cpu and acct" / "cpu.cfs_quota_us", "50000\n")
    write(tmp_path / "cpu and acct" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota(proc) == 0.5
    assert usable_cpus(proc) == 1  # at least one


def test_no_quota_leaves_the_affinity(tmp_path):
    proc = fake_proc(tmp_path, "1:cpu:/\n0::/\n", ["32 31 0:29 / {root}/cpu rw - cgroup cgroup rw,cpu",
                                                  "41 31 0:38 / {root}/unified rw - cgroup2 cgroup2 rw"])
    write(tmp_path / "cpu" / "cpu.cfs_quota_us", "-1\n")
    write(tmp_path / "cpu" / "cpu.cfs_period_us", "100000\n")
    (tmp_path / "unified").mkdir()  # a hybrid system's v2 hierarchy, without the cpu controller: no cpu.max
    assert cgroup_cpu_quota(proc) is None
    assert usable_cpus(proc) == affinity_cpus() == len(os.sched_getaffinity(0))


def test_unreadable_or_garbled_cgroup_files_mean_no_quota(tmp_path):
    proc = fake_proc(tmp_path, "0::/a\nnonsense\n", ["bad line", "30 22 0:26 / {root}/cg rw - cgroup2 cgroup2 rw"])
    write(tmp_path / "cg" / "a" / "cpu.max", "lots 0\n")
    write(tmp_path / "cg" / "cpu.max", "100000 0\n")
    assert cgroup_cpu_quota(proc) is None
    assert cgroup_cpu_quota(tmp_path / "no-such-proc") is None
    assert usable_cpus(tmp_path / "no-such-proc") == affinity_cpus()


def test_memory_limits_v2_and_v1_tightest_wins(tmp_path):
    proc = fake_proc(tmp_path, "0::/kubepods/pod1/ctr\n", ["30 22 0:26 / {root}/cg rw - cgroup2 cgroup2 rw"])
    write(tmp_path / "cg" / "kubepods" / "pod1" / "memory.max", "4294967296\n")  # the pod's 4 GiB
    write(tmp_path / "cg" / "kubepods" / "pod1" / "ctr" / "memory.max", "max\n")
    assert cgroup_memory_limit(proc) == 4 << 30
    v1 = tmp_path / "v1"
    v1.mkdir()
    proc = fake_proc(v1, "9:memory:/\n4:cpu,cpuacct:/\n", ["35 31 0:32 / {root}/memory rw - cgroup cgroup rw,memory"])
    write(v1 / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")  # v1's "no limit"
    assert cgroup_memory_limit(proc) is None
    write(v1 / "memory" / "memory.limit_in_bytes", "1073741824\n")
    assert cgroup_memory_limit(proc) == 1 << 30
    assert cgroup_cpu_quota(proc) is None  # no cpu hierarchy mounted: no quota


# ---- a real cgroup ----------------------------------------------------------------------------------------------


def test_a_process_in_a_one_cpu_cgroup_sizes_for_one_cpu():
    assert affinity_cpus() >= 2, "the test needs a machine of 2 CPUs or more to tell a quota from the affinity"
    code = "from serving.cgroups import cgroup_cpu_quota, usable_cpus; print(cgroup_cpu_quota(), usable_cpus())"
    with cpu_quota_cgroup(1.0) as cgroup:
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True,
                             preexec_fn=join_cgroup(cgroup)).stdout.split()
    assert out == ["1.0", "1"]
    outside = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    assert outside == [str(cgroup_cpu_quota()), str(usable_cpus())]


def test_the_server_in_a_one_cpu_container_starts_one_worker_of_one_thread():
    assert affinity_cpus() >= 2, "the test needs a machine of 2 CPUs or more to tell a quota from the affinity"
    with cpu_quota_cgroup(1.0) as cgroup, \
            started_server(models=["lenet5"], preexec_fn=join_cgroup(cgroup)) as (base, proc):
        [card] = httpx.get(f"{base}/models", timeout=30).json()["models"]
        assert {k: card["runtime"][k] for k in ("cpus", "workers", "threads")} == {"cpus": 1, "workers": 1,
                                                                                  "threads": 1}
        assert len(worker_pids(proc)) == 1, worker_pids(proc)
        digit = (REPO_ROOT / "examples" / "digit-7.png").read_bytes()
        r = httpx.post(f"{base}/classify", params={"model": "lenet5"}, content=digit,
                       headers={"Content-Type": "image/png"}, timeout=30)
        assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "7", r.text
    # The Kubernetes manifests set CONVNET_CPUS from the pod's CPU request, where there is no quota to read.
    with started_server(env={"CONVNET_CPUS": "1"}, models=["lenet5"]) as (base, proc):
        [card] = httpx.get(f"{base}/models", timeout=30).json()["models"]
        assert (card["runtime"]["cpus"], card["runtime"]["workers"], card["runtime"]["threads"]) == (1, 1, 1)
        assert len(worker_pids(proc)) == 1, worker_pids(proc)


def test_the_batch_cli_in_a_one_cpu_container_decodes_and_infers_on_one_cpu(tmp_path):
    """convnet-classify's defaults (--workers decoders, --threads onnxruntime threads) follow the quota too."""
    assert affinity_cpus() >= 2, "the test needs a machine of 2 CPUs or more to tell a quota from the affinity"
    digit = REPO_ROOT / "examples" / "digit-7.png"
    summary = tmp_path / "summary.json"
    with cpu_quota_cgroup(1.0) as cgroup:
        r = subprocess.run([sys.executable, "-m", "serving.batch", str(digit), str(digit), "--model", "lenet5",
                            "--top-k", "1", "--summary-json", str(summary)], cwd=REPO_ROOT, capture_output=True,
                           text=True, timeout=120, preexec_fn=join_cgroup(cgroup),
                           env={**os.environ, "ORT_DISABLE_TELEMETRY": "1"})
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["predictions"][0]["label"] for line in r.stdout.splitlines()] == ["7", "7"]
    done = json.loads(summary.read_text())
    assert (done["workers"], done["threads"], done["processed"]) == (1, 1, 2), done


def test_the_server_under_a_memory_limit_starts_the_workers_it_holds():
    """Two CPUs call for two front workers; AlexNet's take ~0.75 GiB each at their peak (decoding large pictures),
    so a 1 GiB limit holds one, which then runs onnxruntime on both CPUs. Without the fitting a worker would be
    killed for memory under load, with the requests it held."""
    assert affinity_cpus() >= 2, "the test needs a machine of 2 CPUs or more"
    with memory_limit_cgroup(1 << 30) as cgroup, \
            started_server(env={"CONVNET_CPUS": "2"}, preexec_fn=join_cgroup(cgroup)) as (base, proc):
        cards = {c["name"]: c for c in httpx.get(f"{base}/models", timeout=30).json()["models"]}
        runtime = cards["alexnet"]["runtime"]
        assert (runtime["workers"], runtime["threads"], runtime["memory_limit_mib"]) == (1, 2, 1024), runtime
        assert len(worker_pids(proc)) == 1, worker_pids(proc)
        assert "the memory limit of 1024 MiB holds 1 worker(s)" in server_log(proc, 100_000), server_log(proc)
        digit = (REPO_ROOT / "examples" / "digit-7.png").read_bytes()
        r = httpx.post(f"{base}/classify", params={"model": "lenet5"}, content=digit,
                       headers={"Content-Type": "image/png"}, timeout=30)
        assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "7", r.text
    # An explicit worker count is kept (the operator's call), with no limit nothing is fitted.
    with memory_limit_cgroup(1 << 30) as cgroup, \
            started_server(env={"CONVNET_API_WORKERS": "2"}, models=["lenet5"], preexec_fn=join_cgroup(cgroup)) \
            as (base, proc):
        [card] = httpx.get(f"{base}/models", timeout=30).json()["models"]
        assert (card["runtime"]["workers"], card["runtime"]["memory_limit_mib"]) == (2, 1024)
