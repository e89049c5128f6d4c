"""CPU per request across the model-service hop, on a machine without a GPU (docs/gpu.md).

    python -m loadtests.hop_cost [--seconds 12] [--connections 16]

LeNet-5 served from the model service (CONVNET_PLACEMENT=model_service), one front and one model worker, wrk POSTing a
digit. LeNet-5's model call is ~0.1 ms, so the model worker's CPU per request is the hop's own cost: what a GPU model
worker pays per request around the GPU's work.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from loadtests.bench import run_wrk
from loadtests.servers import cpu_seconds

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from serverproc import free_port, start_server, stop_server, wait_ready, worker_pids  # noqa: E402

ENV = {"CONVNET_PLACEMENT": "model_service", "CONVNET_MODELS": "lenet5", "CONVNET_API_WORKERS": "1",
       "CONVNET_MODEL_WORKERS": "1"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=int, default=12)
    p.add_argument("--connections", type=int, default=16)
    args = p.parse_args(argv)
    port = free_port()
    proc = start_server(port, env=ENV)
    base, files = f"http://127.0.0.1:{port}", [REPO / "examples" / "digit-7.png"]
    try:
        wait_ready(base, proc)
        pids = worker_pids(proc)
        run_wrk(base, "/classify?model=lenet5", "image/png", files, 8, 4, None)  # warm-up
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        run = run_wrk(base, "/classify?model=lenet5", "image/png", files, args.connections, args.seconds, None)
        cpu_ms = {name: round((cpu_seconds(pid) - before[name]) / run["requests"] * 1000, 3)
                  for name, pid in pids.items()}
    finally:
        stop_server(proc)
    print(json.dumps({"img_per_s": round(run["rate"]), "errors": run["errors"], "cpu_ms_per_request": cpu_ms}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
