"""Realistic traffic for the convnet-serving service, for Locust.

Run it through the runner, which can start the service, bounds the run, keeps the CSV/HTML report and checks SLOs:

    python -m loadtests.run --start-server --users 8 --spawn-rate 4 --run-time 60s --max-failure-ratio 0

or with plain Locust against a running service (web UI on :8089, or headless as here):

    locust -f loadtests/locustfile.py --host http://127.0.0.1:3000 --headless -u 8 -r 4 -t 60s \\
        --csv results/run --html results/run.html [--models alexnet,lenet5] [--think-time 0.5]

Traffic mix (`MIX` below, weights 5:4:3:3:1:1): AlexNet photos as multipart uploads (JPEG, some PNG with alpha)
and as raw JPEG bodies, LeNet-5 MNIST digits both ways, and a small share of `classify_batch` calls for each model
(2-4 photos, 4-8 digits); with --models only the named models' share is kept. The images come from
`loadtests.images.build_pool` (deterministic: every Locust process sends the same pool). Every response is
validated (status, JSON shape, number of predictions, score order), so a fast wrong answer counts as a failure.
A service with API keys on needs the key in $CONVNET_API_KEY.
"""

from __future__ import annotations

import csv
import json
import os
import random
import uuid

import gevent
from locust import FastHttpUser, events, task
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV

from loadtests.contract import BATCH_FIELD, check_batch, check_predictions
from loadtests.images import DEFAULT_SEED, PoolImage, build_pool, for_model
from serving.keys import CLIENT_KEY_ENV, client_headers

TOP_K = {"alexnet": 5, "lenet5": 3}
# A service with API keys on (docs/keys.md) gets the key in $CONVNET_API_KEY on every request.
AUTH = client_headers(os.environ.get(CLIENT_KEY_ENV))
BATCH_SIZES = {"alexnet": (2, 4), "lenet5": (4, 8)}

# The traffic mix: (weight, model, kind). Kinds for models not under test are dropped, the rest keep their ratios.
MIX: tuple[tuple[int, str, str], ...] = (
    (5, "alexnet", "multipart"),
    (4, "alexnet", "raw"),  # JPEG only: a client posting a file straight from disk or a camera
    (3, "lenet5", "multipart"),
    (3, "lenet5", "raw"),
    (1, "alexnet", "batch"),
    (1, "lenet5", "batch"),
)

POOL: dict[str, list[PoolImage]] = {}
ACTIVE_MIX: list[tuple[int, str, str]] = []
ENVIRONMENT: list = []  # the Locust environment, for the quit hook


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    parser.add_argument("--models", default="alexnet,lenet5",
                        help="comma-separated models to send traffic to (default: alexnet,lenet5)")
    parser.add_argument("--pool-seed", type=int, default=DEFAULT_SEED, help="seed of the generated image pool")
    parser.add_argument("--think-time", type=float, default=0.0,
                        help="each user waits uniform(0, this) seconds between requests (default 0: closed loop)")


@events.init.add_listener
def _build_pool(environment, **_kwargs) -> None:
    opts = environment.parsed_options
    models = [m for m in (opts.models if opts else "alexnet,lenet5").split(",") if m]
    unknown = set(models) - set(TOP_K)
    if unknown or not models:
        raise SystemExit(f"--models: unknown {sorted(unknown) or 'empty list'}; known: {sorted(TOP_K)}")
    seed = opts.pool_seed if opts else DEFAULT_SEED
    photos = "alexnet" in models
    pool = build_pool(seed=seed, photos=16 if photos else 0, pngs=4 if photos else 0,
                      digits=32 if "lenet5" in models else 0)
    POOL.clear()
    for model in models:
        POOL[model] = for_model(pool, model)
    ACTIVE_MIX[:] = [entry for entry in MIX if entry[1] in POOL]
    ENVIRONMENT[:] = [environment]
    # Building the pool blocked the event loop for a second or more; gevent's clock is cached per loop iteration,
    # so without this the --run-time timer Locust arms next would fire that much early.
    gevent.get_hub().loop.update_now()


@events.quit.add_listener
def _write_final_stats(**_kwargs) -> None:
    """<csv prefix>_final_stats.csv: the stats at the very end. Locust rewrites <prefix>_stats.csv once a second, so
    that file misses the last second of a run; the runner's SLO checks read this one."""
    opts = ENVIRONMENT[0].parsed_options if ENVIRONMENT else None
    if opts is None or not opts.csv_prefix:
        return
    with open(f"{opts.csv_prefix}_final_stats.csv", "w", newline="") as f:
        StatsCSV(ENVIRONMENT[0], PERCENTILES_TO_REPORT).requests_csv(csv.writer(f))


def multipart(parts: list[tuple[str, PoolImage]]) -> tuple[bytes, str]:
    """A multipart/form-data body with one file part per (field, image); returns (body, Content-Type)."""
    boundary = uuid.uuid4().hex
    chunks = []
    for field_name, image in parts:
        chunks.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; filename="{image.name}"\r\n'
            f"Content-Type: {image.content_type}\r\n\r\n".encode()
        )
        chunks.append(image.data)
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


class ServiceUser(FastHttpUser):
    """One client sending a realistic mix of single and batch classifications."""

    def wait_time(self) -> float:
        think = self.environment.parsed_options.think_time if self.environment.parsed_options else 0.0
        return random.uniform(0.0, think) if think > 0 else 0.0

    def _classify(self, model: str, raw: bool, jpeg_only: bool = False) -> None:
        images = POOL[model]
        if jpeg_only:
            images = [p for p in images if p.content_type == "image/jpeg"] or images
        image = random.choice(images)
        k = TOP_K[model]
        if raw:
            body, ctype = image.data, image.content_type
        else:
            body, ctype = multipart([("image", image)])
        name = f"/classify {model} {'raw' if raw else 'multipart'} {image.content_type.split('/')[1]}"
        with self.client.post(f"/classify?model={model}&top_k={k}", data=body, headers={"Content-Type": ctype, **AUTH},
                              name=name, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
                return
            try:
                problem = check_predictions(json.loads(resp.content), model, k)
            except ValueError:
                problem = "body is not JSON"
            if problem:
                resp.failure(problem)

    @task
    def one_request(self) -> None:
        _, model, kind = random.choices(ACTIVE_MIX, weights=[w for w, _, _ in ACTIVE_MIX])[0]
        if kind == "batch":
            self._classify_batch(model)
        else:
            self._classify(model, raw=kind == "raw", jpeg_only=model == "alexnet" and kind == "raw")

    def _classify_batch(self, model: str) -> None:
        lo, hi = BATCH_SIZES[model]
        images = random.sample(POOL[model], min(len(POOL[model]), random.randint(lo, hi)))
        k = TOP_K[model]
        body, ctype = multipart([(BATCH_FIELD, image) for image in images])
        with self.client.post(f"/classify_batch?model={model}&top_k={k}", data=body,
                              headers={"Content-Type": ctype, **AUTH}, name=f"/classify_batch {model}",
                              catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
                return
            try:
                problem = check_batch(json.loads(resp.content), model, k, len(images))
            except ValueError:
                problem = "body is not JSON"
            if problem:
                resp.failure(problem)
