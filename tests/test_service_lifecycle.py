"""A dedicated server: readiness, configured limits, and workers killed with SIGKILL coming back (and logged)."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import imagegen
import pytest
from PIL import Image
from serverproc import MODEL_SERVICE_ENV, free_port, server_log, start_server, stop_server, wait_ready, worker_pids

from serving.config import ServiceConfig, load_config, parallelism

# LeNet-5 through the model service (not inline in the front), so killing the model worker is felt.
LIMITS = {"CONVNET_MODELS": "lenet5", **MODEL_SERVICE_ENV, "CONVNET_MAX_BODY_BYTES": "200000",
          "CONVNET_MAX_PIXELS": "250000", "CONVNET_MAX_BATCH_IMAGES": "3"}


def classify_digit(base: str) -> httpx.Response:
    return httpx.post(f"{base}/classify", params={"model": "lenet5", "top_k": 1},
                      files={"image": ("one.png", imagegen.drawn_digit_one(), "image/png")}, timeout=30)


def wait_until_answering(base: str, timeout: float = 90) -> list[int]:
    """Statuses seen while polling /classify until it answers 200."""
    seen: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = classify_digit(base).status_code
        except httpx.HTTPError:
            status = 0  # connection refused/reset while the worker restarts
        seen.append(status)
        if status == 200:
            return seen
        time.sleep(0.3)
    raise AssertionError(f"no 200 within {timeout}s; saw {seen}")


@pytest.mark.slow
def test_readiness_limits_and_crash_recovery():
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(port, env=LIMITS)
    try:
        # Ready means loaded and warmed up: the first 200 from /readyz comes after the warm-up, and answers work.
        readyz: list[int] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, server_log(proc)
            try:
                readyz.append(httpx.get(f"{base}/readyz", timeout=5).status_code)
            except httpx.HTTPError:
                readyz.append(0)
            if readyz[-1] == 200:
                break
            time.sleep(0.1)
        assert readyz[-1] == 200, server_log(proc)
        assert set(readyz) <= {0, 503, 200}
        assert "model lenet5 ready on cpu" in server_log(proc, tail=100_000)
        r = classify_digit(base)
        assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "1"

        # The configured limits apply (not the defaults).
        assert httpx.get(f"{base}/models").json()["default_model"] == "lenet5"  # alexnet is not served
        r = httpx.post(f"{base}/classify", content=imagegen.random_bytes(300_000),
                       headers={"Content-Type": "image/png"})
        assert r.status_code == 413 and "200,000-byte limit" in r.json()["detail"]
        r = httpx.post(f"{base}/classify", content=imagegen.encode(Image.new("L", (600, 500)), "PNG"),
                       headers={"Content-Type": "image/png"})
        assert r.status_code == 413 and r.json()["error"] == "image_too_large"
        files = [("image", (f"{i}.png", imagegen.drawn_digit_one(), "image/png")) for i in range(4)]
        r = httpx.post(f"{base}/classify_batch", files=files)
        assert r.status_code == 422 and "limit is 3" in r.json()["detail"]

        # SIGKILL each worker: the arbiter restarts it, the crash is logged, no request ever gets a 500.
        for service in ("convnet_models", "convnet"):
            worker, pid = next((n, p) for n, p in worker_pids(proc).items() if n.split(":")[0] == service)
            os.kill(pid, signal.SIGKILL)
            seen = wait_until_answering(base)  # (another model worker, if any, answers meanwhile)
            assert 500 not in seen, seen
            index = worker.split(":")[1]
            line = f"{service} worker {index} (pid {pid}) died without shutting down"
            deadline = time.monotonic() + 90
            while line not in server_log(proc, tail=200_000) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert line in server_log(proc, tail=200_000), server_log(proc)[-3000:]
            assert pid not in worker_pids(proc).values()
            assert 500 not in wait_until_answering(base)
        assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200
    finally:
        stop_server(proc)


def test_config_layers(tmp_path):
    assert load_config({}) == ServiceConfig()
    toml = tmp_path / "convnet.toml"
    toml.write_text('max_batch_size = 8\nmodels = ["lenet5"]\ndevice = "cpu"\n')
    cfg = load_config({"CONVNET_CONFIG": str(toml), "CONVNET_MAX_BATCH_SIZE": "16", "CONVNET_ORT_THREADS": "2"})
    assert (cfg.max_batch_size, cfg.models, cfg.device, cfg.ort_threads) == (16, ("lenet5",), "cpu", 2)
    with pytest.raises(ValueError, match="CONVNET_MAX_BODY_BYTES"):
        load_config({"CONVNET_MAX_BODY_BYTES": "lots"})
    with pytest.raises(ValueError, match="CONVNET_DEVICE"):
        load_config({"CONVNET_DEVICE": "tpu"})
    with pytest.raises(ValueError, match="CONVNET_MAX_BATCH_SIZE"):
        load_config({"CONVNET_MAX_BATCH_SIZE": "0"})
    # Automatic parallelism: single-threaded model workers on CPU (one per CPU, at most 4), one worker on a GPU.
    def workers(cfg, gpu, service, cpus):
        w = parallelism(cfg, gpu, service, cpus)
        return w["api_workers"], w["front_ort_threads"], w["model_workers"], w["model_ort_threads"]

    assert workers(ServiceConfig(), False, False, 2) == (2, 1, 2, 1)  # CPU: inference in each front worker
    assert workers(ServiceConfig(), False, False, 16) == (4, 4, 4, 4)
    assert workers(ServiceConfig(), True, True, 16) == (16, 1, 1, 16)  # GPU: 16 decoding fronts, one GPU worker
    assert workers(ServiceConfig(model_workers=1, ort_threads=3), False, True, 2) == (2, 3, 1, 3)
    toml.write_text("max_batch = 8\n")
    with pytest.raises(ValueError, match="unknown settings"):
        load_config({"CONVNET_CONFIG": str(toml)})


def test_overload_is_shed_with_503_json_and_the_service_recovers():
    # A 1 ms queueing budget: requests that would wait longer for AlexNet are shed by BentoML's dispatcher.
    env = {"CONVNET_MAX_LATENCY_MS": "1", "CONVNET_MODEL_WORKERS": "1", "CONVNET_MODELS": "alexnet"}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(port, env=env)
    try:
        wait_ready(base, proc)
        photo = imagegen.photo(400, 300)

        def one(_: int) -> httpx.Response:
            return httpx.post(f"{base}/classify", params={"top_k": 1}, content=photo,
                              headers={"Content-Type": "image/jpeg"}, timeout=60)

        with ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(one, range(48)))
        statuses = [r.status_code for r in answers]
        assert set(statuses) <= {200, 503}, statuses
        assert 503 in statuses and 200 in statuses, statuses
        for r in answers:
            if r.status_code == 503:
                assert r.json()["error"] == "server_busy"
        assert 200 in [one(0).status_code for _ in range(5)]  # alone again, it answers
        assert httpx.get(f"{base}/readyz").status_code == 200
    finally:
        stop_server(proc)
