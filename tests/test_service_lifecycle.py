"""A dedicated server: readiness, configured limits, and workers killed with SIGKILL coming back (and logged)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import imagegen
import numpy as np
import pytest
from PIL import Image
from serverproc import MODEL_SERVICE_ENV, free_port, server_log, start_server, stop_server, wait_ready, worker_pids

from serving.config import ServiceConfig, fit_to_memory, load_config, parallelism, size_workers

pytestmark = pytest.mark.serial  # shedding, restarts and shutdown under load, timed: `make test` runs it alone

# Every model in the separate model service with ONE model worker, so killing that worker is felt by every request
# (503 server_busy until it is back), and AlexNet's load makes the warm-up long enough to be seen from outside.
LIMITS = {**MODEL_SERVICE_ENV, "CONVNET_MODELS": "lenet5,alexnet", "CONVNET_MODEL_WORKERS": "1",
          "CONVNET_MAX_BODY_BYTES": "200000", "CONVNET_MAX_PIXELS": "250000", "CONVNET_MAX_BATCH_IMAGES": "3"}
DEVICES = ("cpu", "cuda", "tensorrt")


def classify_digit(base: str) -> httpx.Response:
    return httpx.post(f"{base}/classify", params={"model": "lenet5", "top_k": 1},
                      files={"image": ("one.png", imagegen.drawn_digit_one(), "image/png")}, timeout=30)


def lenet_stat(base: str) -> dict:
    return httpx.get(f"{base}/v2/models/lenet5/stats", timeout=10).json()["model_stats"][0]


def poll_until_answering(base: str, timeout: float = 90) -> list[httpx.Response | None]:
    """Answers seen while polling /classify until it answers 200 (None: connection refused/reset)."""
    seen: list[httpx.Response | None] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            seen.append(classify_digit(base))
        except httpx.HTTPError:
            seen.append(None)  # the front worker itself is restarting
        if seen[-1] is not None and seen[-1].status_code == 200:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"no 200 within {timeout}s; saw {statuses(seen)}")


def statuses(seen: list[httpx.Response | None]) -> list[int]:
    return [0 if r is None else r.status_code for r in seen]


def first_answers_from_start(base: str, proc, timeout: float = 180) -> tuple[list[int], str]:
    """/readyz polled from the moment the server is launched (0: nothing listening yet) until it says 200, and the
    server's log as it was when the first HTTP answer of any kind came back."""
    seen: list[int] = []
    log_at_first_answer = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, server_log(proc)
        try:
            seen.append(httpx.get(f"{base}/readyz", timeout=30).status_code)
            log_at_first_answer = log_at_first_answer or server_log(proc, tail=1_000_000)
        except httpx.HTTPError:
            seen.append(0)
        if seen[-1] == 200:
            return seen, log_at_first_answer
        time.sleep(0.05)
    raise AssertionError(f"/readyz not 200 within {timeout}s; saw {sorted(set(seen))}\n{server_log(proc)}")


def wait_for_log(proc, line: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while line not in server_log(proc, tail=200_000) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert line in server_log(proc, tail=200_000), server_log(proc)[-3000:]


@pytest.mark.slow
def test_readiness_limits_and_crash_recovery():
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(port, env=LIMITS)
    try:
        # Ready means loaded and warmed up: nothing answers (not even /readyz) before every model has run one
        # real inference, so the first answer a client can get comes after the warm-up lines in the log.
        readyz, log = first_answers_from_start(base, proc)
        assert readyz[0] == 0 and set(readyz) <= {0, 503, 200}, readyz
        for model in ("lenet5", "alexnet"):
            found = re.search(rf"model {model} ready on (\w+)", log)
            assert found, f"the server answered before {model} was warmed up:\n{log[-3000:]}"
            assert found.group(1) in DEVICES
            print(f"{model} warmed up on {found.group(1)}")
        r = classify_digit(base)
        assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "1"

        # The configured limits apply (not the defaults).
        assert {m["name"] for m in httpx.get(f"{base}/models", timeout=30).json()["models"]} == {"lenet5", "alexnet"}
        r = httpx.post(f"{base}/classify", content=imagegen.random_bytes(300_000),
                       headers={"Content-Type": "image/png"})
        assert r.status_code == 413 and "200,000-byte limit" in r.json()["detail"]
        r = httpx.post(f"{base}/classify", content=imagegen.encode(Image.new("L", (600, 500)), "PNG"),
                       headers={"Content-Type": "image/png"})
        assert r.status_code == 413 and r.json()["error"] == "image_too_large"
        files = [("image", (f"{i}.png", imagegen.drawn_digit_one(), "image/png")) for i in range(4)]
        r = httpx.post(f"{base}/classify_batch", files=files)
        assert r.status_code == 422 and "limit is 3" in r.json()["detail"]
        # /v2's model configuration says so too: a Triton client sizes its batches by it.
        assert httpx.get(f"{base}/v2/models/lenet5/config", timeout=10).json()["max_batch_size"] == 3
        # /v2's statistics: the model service's calls are counted in its worker, by rows; which requests a call
        # answered only BentoML's dispatcher knows, so per-request queue and compute stay zero (serving/statistics.py).
        stat = lenet_stat(base)
        assert stat["execution_count"] >= 1 and stat["inference_stats"]["success"]["count"] >= 1
        assert sum(s["compute_infer"]["count"] for s in stat["batch_stats"]) == stat["execution_count"]
        assert all(s["compute_input"]["count"] == 0 and s["compute_infer"]["ns"] > 0 for s in stat["batch_stats"])
        assert stat["inference_stats"]["queue"]["count"] == stat["inference_stats"]["compute_infer"]["count"] == 0

        # SIGKILL the only model worker: the arbiter restarts it (the crash is logged), no request ever gets a 500,
        # and answers come back (a request sent meanwhile gets 503: the test below).
        worker, pid = next((n, p) for n, p in worker_pids(proc).items() if n.split(":")[0] == "convnet_models")
        os.kill(pid, signal.SIGKILL)
        seen = poll_until_answering(base)
        assert set(statuses(seen)) <= {503, 200}, statuses(seen)
        for r in seen:
            assert r.status_code == 200 or r.json()["error"] == "server_busy", r.text
        wait_for_log(proc, f"convnet_models worker {worker.split(':')[1]} (pid {pid}) died without shutting down")
        assert pid not in worker_pids(proc).values()
        # The dead worker's calls still count, with the new one's (its answer just now) on top.
        assert lenet_stat(base)["execution_count"] > stat["execution_count"]

        # SIGKILL the front worker: connections fail until it is back, and then it answers; no 500 meanwhile.
        worker, pid = next((n, p) for n, p in worker_pids(proc).items() if n.split(":")[0] == "convnet")
        os.kill(pid, signal.SIGKILL)
        seen = poll_until_answering(base)
        assert set(statuses(seen)) <= {0, 503, 200}, statuses(seen)
        wait_for_log(proc, f"convnet worker {worker.split(':')[1]} (pid {pid}) died without shutting down")
        assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200
    finally:
        stop_server(proc)


SHED_DETAILS = {"the server is overloaded; retry shortly",
                "the model worker did not answer in time (overloaded, or restarting); retry shortly"}


@pytest.mark.slow
def test_503_server_busy_while_the_only_model_worker_restarts():
    # A request gets max_latency_ms plus its compute (2 s + 0.25 s an image) from the model service, then 503.
    env = {**MODEL_SERVICE_ENV, "CONVNET_MODELS": "lenet5", "CONVNET_MODEL_WORKERS": "1",
           "CONVNET_MAX_LATENCY_MS": "1000"}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(port, env=env)
    try:
        wait_ready(base, proc)
        pid = next(p for n, p in worker_pids(proc).items() if n.split(":")[0] == "convnet_models")
        os.kill(pid, signal.SIGKILL)
        # A new worker is a new Python process importing BentoML and onnxruntime: seconds on any host, so a request
        # sent at once meets no worker and must be told so promptly.
        r = httpx.post(f"{base}/classify", params={"model": "lenet5"}, content=imagegen.drawn_digit_one(),
                       headers={"Content-Type": "image/png"}, timeout=10)
        assert r.status_code == 503 and r.json()["error"] == "server_busy", r.text
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
    assert load_config({"CONVNET_PRECISION": "fp16"}).precision == "fp16"
    with pytest.raises(ValueError, match="CONVNET_PRECISION must be one of auto, fp32, fp16"):
        load_config({"CONVNET_PRECISION": "int8"})
    with pytest.raises(ValueError, match="CONVNET_MAX_BATCH_SIZE"):
        load_config({"CONVNET_MAX_BATCH_SIZE": "0"})
    # Automatic parallelism: on CPU inference runs in each front worker (one per CPU, at most 4); on a GPU a quarter
    # of the CPUs are model workers sharing the GPU, the rest decoding fronts (measured on an H200: docs/gpu.md).
    def workers(cfg, gpu, service, cpus):
        w = parallelism(cfg, gpu, service, cpus)
        return w["api_workers"], w["front_ort_threads"], w["model_workers"], w["model_ort_threads"]

    assert workers(ServiceConfig(), False, False, 2) == (2, 1, 2, 1)  # CPU: inference in each front worker
    assert workers(ServiceConfig(), False, False, 16) == (4, 4, 4, 4)
    assert workers(ServiceConfig(), True, True, 16) == (12, 1, 4, 4)  # GPU: 12 decoding fronts, 4 GPU workers
    assert workers(ServiceConfig(), True, True, 2) == (1, 2, 1, 2)
    assert workers(ServiceConfig(model_workers=1), True, True, 16) == (15, 1, 1, 16)
    assert workers(ServiceConfig(model_workers=1, ort_threads=3), False, True, 2) == (2, 3, 1, 3)
    # Every model in front on a GPU: each front worker decodes and runs its own GPU session, one per CPU up to 16.
    assert workers(ServiceConfig(placement="front"), True, False, 16)[0] == 16
    assert workers(ServiceConfig(placement="front"), True, False, 32)[0] == 16
    assert workers(ServiceConfig(placement="front"), True, False, 2)[0] == 2
    # CONVNET_CPUS sizes for that many CPUs instead of those detected (serving/cgroups.py), and says so.
    assert workers(ServiceConfig(cpus=1), False, False, None) == (1, 1, 1, 1)
    assert parallelism(ServiceConfig(cpus=8), False, False)["cpus"] == 8
    assert load_config({"CONVNET_CPUS": "3"}).cpus == 3
    # A memory limit lowers the automatic worker counts, the larger first, until their peaks fit (serving/config.py's
    # estimates: docs/deploy.md); the onnxruntime threads then spread over the workers left.
    alexnet, lenet = 61_100_840, 61_706
    cpu = parallelism(ServiceConfig(), False, False, 2)
    assert fit_to_memory(ServiceConfig(), cpu, None, alexnet + lenet, 0) == {**cpu, "memory_limit": 0, "peak_bytes": 0}
    fitted = fit_to_memory(ServiceConfig(), cpu, 1 << 30, alexnet + lenet, 0)
    assert (fitted["api_workers"], fitted["front_ort_threads"], fitted["memory_limit"]) == (1, 2, 1 << 30)
    assert fitted["peak_bytes"] <= 1 << 30
    assert fit_to_memory(ServiceConfig(), cpu, 4 << 30, alexnet + lenet, 0)["api_workers"] == 2
    assert fit_to_memory(ServiceConfig(api_workers=2), cpu, 1 << 30, alexnet, 0)["api_workers"] == 2  # explicit
    gpu = parallelism(ServiceConfig(), True, True, 16)  # 12 decoding fronts, 4 model workers
    fitted = fit_to_memory(ServiceConfig(), gpu, 4 << 30, lenet, alexnet)
    assert (fitted["api_workers"], fitted["model_workers"]) == (4, 4) and fitted["peak_bytes"] <= 4 << 30
    assert fit_to_memory(ServiceConfig(), gpu, 1 << 20, lenet, alexnet)["api_workers"] == 1  # one of each, at least
    params = {"alexnet": alexnet, "lenet5": lenet}
    workers, note = size_workers(ServiceConfig(cpus=2), False, ["alexnet", "lenet5"], [], params, 1 << 30)
    assert workers["api_workers"] == 1 and note.startswith("the memory limit of 1024 MiB holds 1 worker(s) (~")
    assert note.endswith("not the 2 that 2 CPU(s) call for (docs/deploy.md)")
    assert size_workers(ServiceConfig(cpus=2), False, ["lenet5"], [], params, 4 << 30)[1] == ""
    # Borrowing idle cores holds AlexNet twice in each front worker: 3 GiB holds 3 workers without it, 2 with it.
    assert size_workers(ServiceConfig(cpus=4), False, ["alexnet"], [], params, 3 << 30)[0]["api_workers"] == 3
    assert size_workers(ServiceConfig(cpus=4, borrow_idle_cpus=1), False, ["alexnet"], [], params,
                        3 << 30)[0]["api_workers"] == 2
    toml.write_text("max_batch = 8\n")
    with pytest.raises(ValueError, match="unknown settings"):
        load_config({"CONVNET_CONFIG": str(toml)})


def test_overload_is_shed_with_503_json_and_the_service_recovers():
    """Shedding by construction, not by host speed: one model worker, a 1 ms queueing budget, and requests that each
    carry a full batch of 32 AlexNet images (one model call each, far over 1 ms on any CPU or GPU). While one call
    runs, every request queued behind it has waited longer than the budget, so BentoML's dispatcher must shed it."""
    env = {**MODEL_SERVICE_ENV, "CONVNET_MAX_LATENCY_MS": "1", "CONVNET_MODEL_WORKERS": "1",
           "CONVNET_MODELS": "alexnet", "CONVNET_MAX_BATCH_SIZE": "32"}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(port, env=env)
    try:
        wait_ready(base, proc)
        files = [("image", (f"{i}.jpg", imagegen.photo(320, 240, seed=i), "image/jpeg")) for i in range(32)]

        def one(_: int) -> httpx.Response:
            return httpx.post(f"{base}/classify_batch", params={"top_k": 1}, files=files, timeout=120)

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(one, range(16)))
        statuses = [r.status_code for r in answers]
        assert set(statuses) <= {200, 503}, statuses
        assert 503 in statuses and 200 in statuses, statuses
        for r in answers:
            if r.status_code == 503:
                # shed by BentoML's dispatcher, or by the front's own deadline for the model service's answer
                assert r.json()["error"] == "server_busy", r.text
                assert r.json()["detail"] in SHED_DETAILS, r.text
                assert r.headers["retry-after"] == "1"
            else:
                assert len(r.json()["results"]) == 32
        # The same through the Open Inference Protocol: its 503 once came without Retry-After.
        pixels = np.zeros((32, 224, 224, 3), dtype=np.uint8)
        header = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": list(pixels.shape),
                                         "parameters": {"binary_data_size": pixels.nbytes}}]}).encode()

        def one_v2(_: int) -> httpx.Response:
            return httpx.post(f"{base}/v2/models/alexnet/infer", content=header + pixels.tobytes(), timeout=120,
                              headers={"Inference-Header-Content-Length": str(len(header))})

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one_v2, range(8)))
        assert {r.status_code for r in answers} <= {200, 503} and 503 in {r.status_code for r in answers}, answers
        for r in answers:
            if r.status_code == 503:
                assert r.json()["error"] in SHED_DETAILS and r.headers["retry-after"] == "1", (r.text, r.headers)
        alone = httpx.post(f"{base}/classify", params={"top_k": 1}, content=imagegen.photo(400, 300),
                           headers={"Content-Type": "image/jpeg"}, timeout=60)
        assert alone.status_code == 200, alone.text  # alone again, it answers
        assert httpx.get(f"{base}/readyz").status_code == 200
    finally:
        stop_server(proc)


def test_an_explicit_device_that_cannot_be_had_stops_the_start():
    """CONVNET_DEVICE=cuda where no CUDA device can be used is an error at start, not a quiet CPU fallback. With
    CUDA_VISIBLE_DEVICES empty no GPU is usable, so this holds on a GPU host too."""
    env = {**MODEL_SERVICE_ENV, "CONVNET_MODELS": "lenet5", "CONVNET_DEVICE": "cuda", "CUDA_VISIBLE_DEVICES": ""}
    port = free_port()
    proc = start_server(port, env=env)
    try:
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pass
        log = server_log(proc, tail=100_000)
        assert proc.returncode not in (None, 0), f"the server did not stop:\n{log[-3000:]}"
        assert "device 'cuda' requested but" in log, log[-3000:]
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
    finally:
        stop_server(proc)


def test_with_the_access_log_on_our_routes_take_bentomls_way_and_behave_the_same() -> None:
    """The front door sends our routes past BentoML's middleware stack, except when a middleware there is wanted for
    them (access log, tracing, CORS): then they go through BentoML's router to the mounted app. Same answers."""
    port = free_port()
    proc = start_server(port, env={"CONVNET_ACCESS_LOG": "1"}, models=["lenet5"])
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, proc)
        r = classify_digit(base)
        assert r.status_code == 200, r.text
        assert "server-timing" in r.headers  # RequestLimits is on this way too
        wrong = httpx.get(f"{base}/classify")
        assert wrong.status_code == 405 and wrong.json()["error"] == "method_not_allowed"
        assert httpx.get(f"{base}/").status_code == 200  # BentoML's own page still answers "/"
        assert "/classify" in httpx.get(f"{base}/docs.json").json()["paths"]
        deadline = time.monotonic() + 10
        while "/classify" not in server_log(proc) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert re.search(r"method=POST,path=/classify,.*status=200", server_log(proc)), "BentoML's access log saw it"
    finally:
        stop_server(proc)


def test_sigterm_answers_the_requests_in_flight_then_exits():
    """docker stop and Kubernetes send SIGTERM to PID 1 (`bentoml serve`, the arbiter) and wait a grace period: a
    request already being served is answered, not cut, and the whole server is gone well within the period."""
    import threading

    port = free_port()
    proc = start_server(port, models=["alexnet"])
    base = f"http://127.0.0.1:{port}"
    photo = imagegen.photo(640, 480)
    outcomes: list[tuple[float, float, int | str]] = []  # (sent, answered, status or the error's name)
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    status: int | str = c.post(f"{base}/classify", params={"model": "alexnet"}, content=photo,
                                               headers={"Content-Type": "image/jpeg"}).status_code
                except httpx.HTTPError as e:
                    status = type(e).__name__
                    time.sleep(0.05)
                outcomes.append((sent, time.monotonic(), status))

    try:
        wait_ready(base, proc)
        with ThreadPoolExecutor(6) as pool:
            clients = [pool.submit(client) for _ in range(6)]
            time.sleep(2)  # requests flowing
            terminated_at = time.monotonic()
            os.kill(proc.pid, signal.SIGTERM)  # the arbiter alone, as a container runtime does
            proc.wait(timeout=30)
            exited_s = time.monotonic() - terminated_at
            stop.set()
            for c in clients:
                c.result()
    finally:
        stop.set()
        stop_server(proc)
    in_flight = [status for sent, answered, status in outcomes if sent < terminated_at < answered]
    assert in_flight, outcomes[-10:]
    assert all(status == 200 for status in in_flight), (in_flight, server_log(proc))
    assert sum(status == 200 for _, _, status in outcomes) > len(in_flight)
    assert exited_s < 30


async def _small_app(scope, receive, send) -> None:
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def _read_answer(sock) -> tuple[bytes, bytes]:
    """(head, body) of one answer with a Content-Length, read from a blocking socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before an answer: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(body) < length:
        body += sock.recv(65536)
    return head, body


def test_a_request_already_sent_when_the_shutdown_comes_is_answered_not_reset():
    """The race behind a fresh-clone CI failure of the SIGTERM test above: a request's bytes arrive on a kept-alive
    connection while the worker's event loop is busy, and the shutdown runs before the loop reads them. uvicorn
    closed such a connection at once, and closing a socket with unread bytes resets it: the client read
    ConnectionResetError. Our protocol (serving/limits.py, GuardedHttpProtocol.shutdown) answers it, then closes."""
    import socket
    import threading

    from serverproc import uvicorn_port, uvicorn_thread

    from serving.limits import GuardedHttpProtocol

    request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with uvicorn_thread(_small_app, http=GuardedHttpProtocol) as server, \
            socket.create_connection(("127.0.0.1", uvicorn_port(server)), timeout=10) as sock, \
            socket.create_connection(("127.0.0.1", uvicorn_port(server)), timeout=10) as idle:
        for each in (sock, idle):
            each.sendall(request)
            assert _read_answer(each)[1] == b"ok"  # kept alive, idle
        connection = next(iter(server.server_state.connections))
        sent, busy = threading.Event(), threading.Event()

        def busy_then_shut_down() -> None:  # on the server's event loop: busy while the next request arrives
            busy.set()
            assert sent.wait(10)
            time.sleep(0.1)  # the bytes are in the socket's buffer, unread
            for each in list(server.server_state.connections):
                each.shutdown()  # what uvicorn's Server.shutdown does on SIGTERM

        connection.loop.call_soon_threadsafe(busy_then_shut_down)
        assert busy.wait(10)
        sock.sendall(request)
        sent.set()
        head, body = _read_answer(sock)
        assert head.startswith(b"HTTP/1.1 200") and body == b"ok"
        assert b"connection: close" in head.lower()  # its last answer: then the server closes the connection
        assert sock.recv(1) == b""
        t0 = time.monotonic()
        assert idle.recv(1) == b""  # a connection that stays quiet is closed after the grace
        assert time.monotonic() - t0 < GuardedHttpProtocol.shutdown_grace_s + 2
