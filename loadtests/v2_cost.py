"""Per-image cost of the Open Inference Protocol path next to /classify, on one running server.

    python -m loadtests.v2_cost [--url http://127.0.0.1:3000 --pid <server pid>] [--model alexnet] [--requests 40]
                                [--images-per-request 1]

Four ways to classify the same real JPEG, one request at a time (so the cost per image is not blurred by queueing):

    classify       POST /classify, the JPEG as the body
    v2-bytes       POST /v2/models/<m>/infer, the JPEG as a BYTES element (binary tensor data): decoded server-side
    v2-uint8       the same endpoint with the model's UINT8 tensor (binary), decoded client-side with
                   serving.preprocess: the server decodes nothing
    v2-uint8-json  the same tensor as a flat JSON list (tritonclient's binary_data=False; what KServe's SDK and
                   curl send): the server parses ~4 bytes of JSON a value

Reported per image: client-observed latency (median and p90 of request latency / images per request), the
server's CPU seconds (user + system of the arbiter and every worker, from /proc/<pid>/stat, before and after the
run), and the server's own account from the statistics extension (/v2/models/<m>/stats, as Triton's perf_analyzer
reads it): its time from a request's headers to its answer, and of that the onnxruntime calls. For v2-uint8 the
client's own decode time is reported too: that work moved, it did not vanish.
Request bodies are built by tritonclient itself (`generate_request_body`), so they are exactly what it sends.
Without --url a server of the one model is started here and stopped afterwards. `measure` is what `make bench`
calls with a server it already runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np

from loadtests.servers import cpu_seconds
from serving.preprocess import preprocess_bytes
from serving.registry import DEFAULT_MODELS_DIR, read_card

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_IMAGE = REPO_ROOT / "examples" / "grace_hopper.jpg"


@dataclass
class Cost:
    variant: str
    images: int
    latency_ms_per_image_median: float
    latency_ms_per_image_p90: float
    server_cpu_ms_per_image: float
    server_ms_per_image: float  # headers to answer, as the server timed it (statistics extension: success)
    onnxruntime_ms_per_image: float  # of which its onnxruntime calls (batch_stats' compute_infer)
    client_decode_ms_per_image: float = 0.0


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def v2_body(inputs: list) -> tuple[bytes, dict[str, str]]:
    """tritonclient's own request body and headers (binary tensor data when it has any)."""
    from tritonclient.http import InferenceServerClient, InferRequestedOutput

    body, json_size = InferenceServerClient.generate_request_body(inputs, [InferRequestedOutput("logits")])
    return body, ({"Inference-Header-Content-Length": str(json_size)} if json_size is not None else {})


def requests_for(model: str, jpeg: bytes, n: int) -> dict[str, tuple[str, bytes, dict[str, str], float]]:
    """variant → (path, body, headers, client decode seconds per image)."""
    from tritonclient.http import InferInput

    recipe = read_card(DEFAULT_MODELS_DIR / model).recipe
    pixels = np.stack([preprocess_bytes(jpeg, recipe) for _ in range(n)])
    decode_s = statistics.median(_timed(preprocess_bytes, jpeg, recipe) for _ in range(9))
    infer = f"/v2/models/{model}/infer"
    encoded = InferInput("image_bytes", [n], "BYTES").set_data_from_numpy(np.array([jpeg] * n, dtype=np.object_))
    tensor = InferInput("image", list(pixels.shape), "UINT8").set_data_from_numpy(pixels)
    tensor_json = InferInput("image", list(pixels.shape), "UINT8").set_data_from_numpy(pixels, binary_data=False)
    out: dict[str, tuple[str, bytes, dict[str, str], float]] = {}
    if n == 1:  # /classify takes one image per request
        out["classify"] = (f"/classify?model={model}", jpeg, {"Content-Type": "application/octet-stream"}, 0.0)
    out["v2-bytes"] = (infer, *v2_body([encoded]), 0.0)
    out["v2-uint8"] = (infer, *v2_body([tensor]), decode_s)
    out["v2-uint8-json"] = (infer, *v2_body([tensor_json]), decode_s)
    return out


def server_times(client: httpx.Client, model: str) -> tuple[float, float]:
    """(seconds from headers to answer of the successful requests, seconds in onnxruntime calls) so far, from the
    statistics extension. The calls are read by rows (batch_stats), which the model service counts too."""
    r = client.get(f"/v2/models/{model}/stats")
    r.raise_for_status()
    (stat,) = r.json()["model_stats"]
    return (stat["inference_stats"]["success"]["ns"] / 1e9,
            sum(s["compute_infer"]["ns"] for s in stat["batch_stats"]) / 1e9)


def measure(url: str, server_pid: int, model: str = "alexnet", image: Path = DEFAULT_IMAGE, requests: int = 40,
            images_per_request: int = 1, warmup: int = 5) -> list[Cost]:
    """Per-image latency and server CPU of each variant against the running server at `url` (process `server_pid`,
    the `bentoml serve` arbiter: its workers are counted with it)."""
    jpeg = image.read_bytes()
    costs = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for variant, (path, body, headers, decode_s) in requests_for(model, jpeg, images_per_request).items():
            for _ in range(warmup):
                client.post(path, content=body, headers=headers).raise_for_status()
            latencies = []
            cpu0, (served0, onnx0) = cpu_seconds(server_pid), server_times(client, model)
            for _ in range(requests):
                t0 = time.perf_counter()
                client.post(path, content=body, headers=headers).raise_for_status()
                latencies.append((time.perf_counter() - t0) / images_per_request)
            cpu, (served, onnx) = cpu_seconds(server_pid) - cpu0, server_times(client, model)
            images = requests * images_per_request
            costs.append(Cost(variant, images, round(1000 * statistics.median(latencies), 2),
                              round(1000 * statistics.quantiles(latencies, n=10)[-1], 2),
                              round(1000 * cpu / images, 2), round(1000 * (served - served0) / images, 2),
                              round(1000 * (onnx - onnx0) / images, 2), round(1000 * decode_s, 2)))
    return costs


def render(costs: list[Cost]) -> str:
    from loadtests.slo import table

    base = next((c for c in costs if c.variant == "classify"), costs[0])
    rows = [[c.variant, c.images, c.latency_ms_per_image_median, c.latency_ms_per_image_p90,
             c.server_cpu_ms_per_image, f"{c.server_cpu_ms_per_image / base.server_cpu_ms_per_image:.2f}x"
             if base.server_cpu_ms_per_image else "-", c.server_ms_per_image, c.onnxruntime_ms_per_image,
             c.client_decode_ms_per_image or "-"] for c in costs]
    return table(["variant", "images", "latency ms/img p50", "p90", "server CPU ms/img", f"vs {base.variant}",
                  "server's own ms/img", "of it onnxruntime", "client decode ms/img"], rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server (then --pid is its bentoml serve process); default: start one")
    p.add_argument("--pid", type=int, help="the server's process id (the arbiter; its workers are included)")
    p.add_argument("--model", default="alexnet")
    p.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    if args.url and not args.pid:
        p.error("--url needs --pid (the server's CPU time is read from /proc/<pid>/stat)")
    kw = {"model": args.model, "image": args.image, "requests": args.requests,
          "images_per_request": args.images_per_request}
    if args.url:
        costs = measure(args.url, args.pid, **kw)
    else:
        from loadtests import servers

        with servers.service(models=[args.model]) as server:
            costs = measure(server.url, server.proc.pid, **kw)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(json.dumps([asdict(c) for c in costs], indent=1) if args.json else render(costs))
    print(f"(load average {load} on {os.cpu_count()} CPUs; one run, sequential requests)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
