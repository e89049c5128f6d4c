"""The CPU serving image, built and run for real: `bentoml containerize` of the bento, started with podman on a free
127.0.0.1 port (host networking), asked to classify a real image and a corrupt one, inspected for torch and for the
user it runs as, then stopped and removed.

On this Docker-less machine the build takes the offline path (scripts/oci/: buildah with vfs storage and chroot
isolation, a base image built from Debian packages, podman with runc). `make test-container` runs only this file;
`make container-tools` (scripts/apt-tools.sh) installs buildah/podman/runc/debootstrap first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

from serving.preprocess import preprocess_bytes
from serving.registry import DEFAULT_MODELS_DIR, load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))

import imagegen  # noqa: E402
from serverproc import free_port  # noqa: E402
from test_deploy import TELEMETRY_OFF, build_bento, split_args, split_env  # noqa: E402

pytestmark = [pytest.mark.container, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parent.parent
OCI = REPO_ROOT / "scripts" / "oci"
READY_TIMEOUT_S = 180.0  # two services, two ONNX sessions and their warm-up on a busy 2-core machine


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    out = subprocess.run([str(OCI / "podman.sh"), *args], capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
    return out


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Iterator[str]:
    """The CPU image of a freshly built bento (built once per run; removed afterwards, the base image is kept)."""
    home = tmp_path_factory.mktemp("bentoml-container")
    bento_dir = build_bento("bentofile.yaml", home)
    tag = f"localhost/convnet-serving:test-{bento_dir.name}"
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML": str(Path(sys.executable).parent / "bentoml"),
           **TELEMETRY_OFF}
    t0 = time.monotonic()
    out = subprocess.run([str(OCI / "containerize.sh"), f"{bento_dir.parent.name}:{bento_dir.name}", tag, "buildah"],
                         env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, f"containerize failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    build_s = time.monotonic() - t0
    size = json.loads(podman("image", "inspect", tag).stdout)[0]["Size"]
    print(f"\ncontainer image {tag}: built in {build_s:.0f} s (base image included if it was missing), "
          f"{size / 1e9:.2f} GB")
    try:
        yield tag
    finally:
        podman("rmi", "-f", tag, check=False)


@contextmanager
def running(image: str, port: int, args: list[str], env: dict[str, str] | None = None,
            podman_args: tuple[str, ...] = ()) -> Iterator[tuple[str, str]]:
    """(name, base URL) of the image running detached with `args` and `env` (and `podman_args` for `podman run`),
    ready; always stopped and removed."""
    name = f"convnet-serving-test-{port}"
    env_args = [a for k, v in (env or {}).items() for a in ("-e", f"{k}={v}")]
    podman("run", "-d", "--name", name, "--network", "host", *podman_args, *env_args, image, *args)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(name, base)
        yield name, base
    finally:
        podman("stop", "-t", "10", name, check=False, timeout=60)
        podman("rm", "-f", name, check=False, timeout=60)


@pytest.fixture(scope="module")
def container(image: str) -> Iterator[tuple[str, str]]:
    """The image as `make container-run` starts it: both services in one container, on a free 127.0.0.1 port."""
    port = free_port()
    with running(image, port, ["--host", "127.0.0.1", "--port", str(port)]) as started:
        yield started


def on_local_port(args: list[str], port: int) -> list[str]:
    """A manifest's container args with the pod port swapped for a free host port (host networking here)."""
    args = list(args)
    args[args.index("--port") + 1] = str(port)
    return [*args, "--host", "127.0.0.1"]


def wait_ready(name: str, base: str) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < READY_TIMEOUT_S:
        state = podman("inspect", "--format", "{{.State.Running}}", name).stdout.strip()
        if state != "true":
            raise AssertionError(f"container exited before ready:\n{podman('logs', name, check=False).stdout[-4000:]}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    logs = podman("logs", name, check=False)
    raise AssertionError(f"{base}/readyz not 200 after {READY_TIMEOUT_S:.0f} s:\n{(logs.stdout + logs.stderr)[-4000:]}")


def expected_top(model: str, data: bytes, k: int) -> list[dict]:
    """What the venv's onnxruntime says for the same bytes: the container must agree."""
    served = load_model(DEFAULT_MODELS_DIR / model, device="cpu")
    batch = preprocess_bytes(data, served.recipe, 40_000_000)[None]
    return served.classify(batch, k)[0]


@pytest.mark.parametrize(("model", "data"), [("alexnet", imagegen.photo()), ("lenet5", imagegen.drawn_digit_one())],
                         ids=["alexnet-jpeg", "lenet5-png"])
def test_classifies_a_real_image_like_the_venv(container, model, data):
    _, base = container
    r = httpx.post(f"{base}/classify", params={"model": model, "top_k": "3"},
                   files={"image": ("upload", data, "image/jpeg" if model == "alexnet" else "image/png")},
                   timeout=60)
    assert r.status_code == 200, r.text
    got = r.json()["predictions"]
    want = expected_top(model, data, 3)
    assert [p["label"] for p in got] == [p["label"] for p in want]
    np.testing.assert_allclose([p["score"] for p in got], [p["score"] for p in want], rtol=1e-4, atol=1e-6)


def test_corrupt_image_is_a_400(container):
    _, base = container
    r = httpx.post(f"{base}/classify", files={"image": ("broken.jpg", imagegen.truncated_jpeg(), "image/jpeg")},
                   timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "corrupt_image" and r.json()["detail"]


def test_serves_both_models(container):
    _, base = container
    r = httpx.get(f"{base}/models", timeout=60)
    assert r.status_code == 200, r.text
    assert sorted(m["name"] for m in r.json()["models"]) == ["alexnet", "lenet5"]


def test_a_container_given_one_cpu_runs_one_worker_of_one_thread(image):
    """`podman run --cpus 1 --memory 1g` (docker's too) on a machine of more CPUs: the container sees them all, and
    its cgroup's quota allows one. The service sizes itself by the quota and the memory limit (serving/cgroups.py),
    as /models reports."""
    assert len(os.sched_getaffinity(0)) >= 2, "the test needs 2 CPUs or more to tell a quota from the machine"
    port = free_port()
    with running(image, port, ["--host", "127.0.0.1", "--port", str(port)], env={"CONVNET_MODELS": "lenet5"},
                 podman_args=("--cpus", "1", "--memory", "1g")) as (_, base):
        [card] = httpx.get(f"{base}/models", timeout=60).json()["models"]
        runtime = card["runtime"]
        assert (runtime["cpus"], runtime["workers"], runtime["threads"], runtime["memory_limit_mib"]) == (1, 1, 1, 1024)
        r = httpx.post(f"{base}/classify", params={"model": "lenet5"}, content=imagegen.drawn_digit_one(),
                       headers={"Content-Type": "image/png"}, timeout=60)
        assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "1", r.text


def test_image_has_no_torch_and_runs_as_non_root(container, image):
    name, _ = container
    probe = ("import importlib.util as u, json, onnxruntime; "
             "print(json.dumps({'torch': u.find_spec('torch') is not None, 'ort': onnxruntime.__version__}))")
    found = json.loads(podman("exec", name, "python", "-c", probe).stdout)
    assert found["torch"] is False
    from importlib.metadata import version
    assert found["ort"] == version("onnxruntime-gpu")  # same onnxruntime release as the venv the tests ran with
    uid = podman("exec", name, "id", "-u").stdout.strip()
    assert uid.isdigit() and int(uid) != 0
    user = json.loads(podman("image", "inspect", image).stdout)[0]["Config"]["User"]
    assert user not in ("", "0", "root")
    env = dict(line.split("=", 1) for line in podman("exec", name, "env").stdout.splitlines() if "=" in line)
    assert TELEMETRY_OFF.items() <= env.items()
    podman("exec", name, "sleep", "0")  # the Kubernetes manifests' preStop hook is `sleep 5`: the image has it


def served_requests(base: str, endpoint: str) -> float:
    """Successful requests a BentoML server counted for one endpoint (its Prometheus /metrics)."""
    text = httpx.get(f"{base}/metrics", timeout=30).text
    counts = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("bentoml_service_request_total{") and f'endpoint="{endpoint}"' in line
              and 'http_response_code="200"' in line]
    assert counts, f"{base}/metrics has no request counter for {endpoint}"
    return sum(counts)


def test_split_deployment_from_the_manifests(image):
    """deploy/kubernetes/split/ for real: a model container and an API container started with the manifests' args
    (the model Service's DNS name swapped for 127.0.0.1), the API answering through the model container."""
    models_port, api_port = free_port(), free_port()
    models_args = on_local_port(split_args("convnet-models"), models_port)
    api_args = on_local_port(split_args("convnet-api"), api_port)
    depends = api_args.index("--depends") + 1
    api_args[depends] = api_args[depends].replace("convnet-models:3000", f"127.0.0.1:{models_port}")
    data = imagegen.drawn_digit_one()
    with running(image, models_port, models_args, split_env("convnet-models")) as (_, models_base), \
            running(image, api_port, api_args, split_env("convnet-api")) as (_, api):
        r = httpx.post(f"{api}/classify", params={"model": "lenet5", "top_k": "1"},
                       files={"image": ("one.png", data, "image/png")}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0]["label"] == expected_top("lenet5", data, 1)[0]["label"]
        r = httpx.post(f"{api}/classify", files={"image": ("broken.jpg", imagegen.truncated_jpeg(), "image/jpeg")},
                       timeout=60)
        assert r.status_code == 400 and r.json()["error"] == "corrupt_image"
        # The manifests place inference in the model pods (CONVNET_PLACEMENT=model_service): the model
        # container's own request counter shows the inference ran there.
        photo = imagegen.photo()
        r = httpx.post(f"{api}/classify", params={"model": "alexnet", "top_k": "1"},
                       files={"image": ("photo.jpg", photo, "image/jpeg")}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0]["label"] == expected_top("alexnet", photo, 1)[0]["label"]
        assert served_requests(models_base, "/logits_alexnet") >= 1
