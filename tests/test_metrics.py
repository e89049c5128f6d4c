"""serving/api.py's Metrics under the garbage collector: a collection can start inside any allocation, including
prometheus_client's own while it holds its non-reentrant multiprocess lock. Reporting a pause from the collector's
callback then deadlocked the worker on its first AlexNet request (seen in the container). Run in a child process,
collecting on almost every allocation, with a deadline: a deadlock shows as a timeout."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent("""
    import gc
    from serving.api import Metrics

    metrics = Metrics()
    metrics.watch_gc()
    gc.set_threshold(1, 1, 1)  # a collection on (almost) every allocation
    for i in range(40):  # each new label value creates a child, under prometheus_client's lock
        metrics.preprocess_seconds.labels(f"model-{i}").observe(0.001)
        metrics.requests.labels("classify", f"model-{i}", "ok").inc()
    gc.set_threshold(700, 10, 10)
    metrics.flush_gc()
    text = metrics.render().decode()
    assert "convnet_gc_pause_seconds_count" in text and "convnet_gc_tracked_objects" in text, text[:2000]
    assert "convnet_gc_pause_cpu_seconds_count" in text, text[:2000]
    print("OK")
""")


def test_collections_during_metric_updates_do_not_deadlock(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
