"""Deployment artifacts: both bentos build and hold what the image needs (and nothing it must not); pyproject.toml,
uv.lock, the images' requirements and the venv the tests run in all agree; and the Kubernetes manifests validate
against the Kubernetes schemas and agree with each other and with the service (probes, ports, labels, GPU resources)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from serving.registry import DEFAULT_MODELS_DIR, discover, read_card

REPO_ROOT = Path(__file__).resolve().parent.parent
K8S_DIR = REPO_ROOT / "deploy" / "kubernetes"
# The cluster version the manifests are checked against (kubernetes-validate ships the schemas: no network).
K8S_VERSION = "1.33"
BENTOFILES = {"cpu": "bentofile.yaml", "gpu": "bentofile.gpu.yaml"}
# As `make bento`: the bento carries the model service too, whatever the build machine's placement would be.
BUILD_WITH_EVERY_SERVICE = {"CONVNET_PLACEMENT": "model_service"}
TELEMETRY_OFF = {"BENTOML_DO_NOT_TRACK": "true", "ORT_DISABLE_TELEMETRY": "1"}


def build_bento(bentofile: str, home: Path) -> Path:
    """`bentoml build -f <bentofile>` into a scratch BENTOML_HOME; returns the bento's directory."""
    env = {**os.environ, "BENTOML_HOME": str(home), **TELEMETRY_OFF, **BUILD_WITH_EVERY_SERVICE}
    out = subprocess.run([sys.executable, "-m", "bentoml", "build", "-f", bentofile, "-o", "tag", "."],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"bentoml build -f {bentofile} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    tag = out.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = tag.split(":")
    bento_dir = home / "bentos" / name / version
    assert (bento_dir / "bento.yaml").is_file(), f"no bento at {bento_dir} (build printed {tag!r})"
    return bento_dir


@pytest.fixture(scope="module", params=sorted(BENTOFILES))
def bento(request, tmp_path_factory) -> tuple[str, Path]:
    variant = request.param
    return variant, build_bento(BENTOFILES[variant], tmp_path_factory.mktemp(f"bentoml-{variant}"))


def requirement_names(requirements: str) -> dict[str, str]:
    """name (lowercase, extras stripped) -> the whole line."""
    lines = [ln.strip() for ln in requirements.splitlines() if ln.strip() and not ln.startswith("#")]
    return {ln.split("[")[0].split("=")[0].split("~")[0].lower(): ln for ln in lines}


def test_bento_has_service_and_model_repository(bento):
    variant, bento_dir = bento
    info = yaml.safe_load((bento_dir / "bento.yaml").read_text())
    assert info["service"] == "serving.service:Convnet"
    assert info["labels"]["variant"] == variant
    src = bento_dir / "src"
    assert (src / "serving" / "service.py").is_file()
    served = sorted(p.name for p in discover(DEFAULT_MODELS_DIR))
    assert served == ["alexnet", "lenet5"], f"run `make models` first (have {served})"
    for name in served:
        card = read_card(DEFAULT_MODELS_DIR / name)
        for rel in ("model.json", card.labels_file, "config.pbtxt", card.onnx["path"]):
            packed, original = src / "models" / name / rel, DEFAULT_MODELS_DIR / name / rel
            assert packed.is_file(), f"{packed.relative_to(bento_dir)} is missing from the {variant} bento"
            assert packed.stat().st_size == original.stat().st_size
    # The demo page's files (GET /demo) travel with the code.
    for f in (REPO_ROOT / "serving" / "static").iterdir():
        packed = src / "serving" / "static" / f.name
        assert packed.is_file() and packed.read_bytes() == f.read_bytes(), f"{f.name}: not in the {variant} bento"
    # Serving code and models only: no training code, tests, datasets, checkpoints or engine caches.
    top = {p.name for p in src.iterdir()}
    assert {"models", "serving"} <= top <= {"models", "serving", "bentofile.yaml", "bentofile.gpu.yaml"}, top
    packed_files = [p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()]
    assert not [p for p in packed_files if p.endswith((".pt", ".pth", ".pyc")) or "trt_cache" in p], packed_files


def test_bento_requirements_are_pinned_without_torch(bento):
    from importlib.metadata import version

    variant, bento_dir = bento
    reqs = requirement_names((bento_dir / "env" / "python" / "requirements.txt").read_text())
    assert "torch" not in reqs and not any(n.startswith("torchvision") for n in reqs)
    for name in ("bentoml", "numpy", "pillow", "tqdm"):
        assert reqs[name] == f"{name}=={version(name)}", reqs[name]
    runtime = version("onnxruntime-gpu")
    if variant == "cpu":
        assert reqs["onnxruntime"] == f"onnxruntime=={runtime}" and "onnxruntime-gpu" not in reqs
    else:
        assert reqs["onnxruntime-gpu"] == f"onnxruntime-gpu=={runtime}" and "onnxruntime" not in reqs
        # the cuda extra, flattened by the export: CUDA and cuDNN come as wheels, only the driver from the host
        assert {"nvidia-cudnn-cu13", "nvidia-cublas", "nvidia-cuda-runtime"} <= set(reqs)
    unpinned = [line for line in reqs.values() if "==" not in line]
    assert not unpinned, f"unpinned requirements: {unpinned}"


def test_bento_image_settings(bento):
    variant, bento_dir = bento
    info = yaml.safe_load((bento_dir / "bento.yaml").read_text())
    envs = {e["name"]: e["value"] for e in info["envs"]}
    assert TELEMETRY_OFF.items() <= envs.items()
    assert info["image"]["python_version"] == "3.11"
    dockerfile = (bento_dir / "env" / "docker" / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile  # what scripts/oci/build-base-image.sh builds offline
    assert "\nUSER bentoml\n" in dockerfile
    if variant == "gpu":
        assert "nvidia/cu13/lib" in envs["LD_LIBRARY_PATH"] and envs["CONVNET_DEVICE"] == "auto"


UV = REPO_ROOT / ".tools" / "bin" / "uv"  # pinned and bootstrapped by `make setup`


# The lock is for x86-64 Linux (pyproject's tool.uv.environments); the images' files drop that marker, so a build for
# another platform fails loudly on a missing wheel instead of silently installing nothing.
TORCH_CPU_WHEEL_SHA256 = "6746dbcbeb526eb61330b76b41ff1b4eb848951103a892eeb080dfa2b264667b"  # torch-2.13.0+cpu, cp311
LOCK_MARKER = " ; platform_machine == 'x86_64' and sys_platform == 'linux'"


def uv(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(UV), *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "UV_PYTHON_DOWNLOADS": "never", "UV_OFFLINE": "1"})


def test_lock_matches_pyproject():
    """pyproject.toml ↔ uv.lock: a dependency changed without `make lock` fails here (and `make setup` refuses)."""
    out = uv("lock", "--check")
    assert out.returncode == 0, out.stderr
    lock = tomllib.loads((REPO_ROOT / "uv.lock").read_text())
    locked = {p["name"]: p for p in lock["package"]}
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    declared = [*project["project"]["dependencies"], *(r for rs in project["project"]["optional-dependencies"].values()
                                                        for r in rs),
                *(r for rs in project["dependency-groups"].values() for r in rs)]
    for line in declared:
        req = Requirement(line)
        (pin,) = req.specifier  # every direct dependency is pinned with ==
        assert pin.operator == "==", line
        name = canonicalize_name(req.name)
        assert pin.contains(locked[name]["version"]), f"{name}: pyproject {pin}, lock {locked[name]['version']}"
    makefile_uv = next(ln.split(":=")[1].strip() for ln in (REPO_ROOT / "Makefile").read_text().splitlines()
                       if ln.startswith("UV_VERSION :="))
    assert locked["uv"]["version"] == makefile_uv, "the bootstrapped uv and the venv's (bentoml build) must agree"
    # Exact versions and hashes for everything an index serves. uv records no hash for a local file, and the one
    # local file is torch's CPU wheel (tool.uv.index "torch-cpu"): its sha256 is checked here instead.
    for pkg in lock["package"]:
        if pkg["name"] == "torch":
            (wheel,) = pkg["wheels"]
            with open(wheel["path"], "rb") as fh:
                assert hashlib.file_digest(fh, "sha256").hexdigest() == TORCH_CPU_WHEEL_SHA256, wheel["path"]
        elif "registry" in pkg["source"]:
            files = pkg.get("wheels", []) + ([pkg["sdist"]] if "sdist" in pkg else [])
            assert files and all(f["hash"].startswith("sha256:") for f in files), pkg["name"]


@pytest.mark.parametrize("variant,extra", [("cpu", "cpu"), ("gpu", "cuda")])
def test_image_requirements_are_exported_from_the_lock(variant, extra):
    """deploy/requirements.*.txt ↔ uv.lock: the images install what the lock says, rewritten only by `make lock`."""
    out = uv("export", "--frozen", "--no-hashes", "--no-default-groups", "--no-emit-project", "--no-header",
             "--extra", extra)
    assert out.returncode == 0, out.stderr
    committed = (REPO_ROOT / "deploy" / f"requirements.{variant}.txt").read_text()
    exported = out.stdout.replace(LOCK_MARKER, "")  # as the Makefile's `lock` target writes them
    assert committed.split("\n", 1)[1] == exported, f"deploy/requirements.{variant}.txt is stale: run `make lock`"


def test_venv_is_exactly_the_lock():
    """The venv the tests run in ↔ uv.lock (nothing missing, nothing extra, no other version)."""
    out = uv("sync", "--frozen", "--extra", "gpu", "--check")
    assert out.returncode == 0, out.stdout + out.stderr


# --- Kubernetes -----------------------------------------------------------------------------------------------------

def manifests() -> dict[str, list[dict]]:
    docs = {p.relative_to(K8S_DIR).as_posix(): [d for d in yaml.safe_load_all(p.read_text()) if d]
            for p in sorted(K8S_DIR.rglob("*.yaml"))}
    assert docs, f"no manifests under {K8S_DIR}"
    return docs


def resources(kind: str) -> dict[str, dict]:
    found = [d for docs in manifests().values() for d in docs if d["kind"] == kind]
    names = [d["metadata"]["name"] for d in found]
    assert len(names) == len(set(names)), f"two {kind}s share a name: {sorted(names)}"
    return dict(zip(names, found, strict=True))


@pytest.mark.parametrize("path", sorted(p.relative_to(K8S_DIR).as_posix() for p in K8S_DIR.rglob("*.yaml")))
def test_manifest_validates_against_kubernetes_schema(path):
    for doc in yaml.safe_load_all((K8S_DIR / path).read_text()):
        if doc:
            # strict: an unknown or misspelt field is an error, not silently ignored by the API server
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_schema_validation_catches_mistakes():
    """The validator is not a rubber stamp: a misspelt field and a wrong type both fail."""
    deployment = resources("Deployment")["convnet-serving"]
    typo = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSION, strict=True)
    wrong_type = {**deployment, "spec": {**deployment["spec"], "replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, K8S_VERSION, strict=True)


def containers_of(deployment: dict) -> list[dict]:
    return deployment["spec"]["template"]["spec"]["containers"]


def test_deployments_probe_the_service_and_request_resources():
    deployments = resources("Deployment")
    assert {"convnet-serving", "convnet-serving-gpu"} <= deployments.keys()
    for name, dep in deployments.items():
        pod = dep["spec"]["template"]
        labels = pod["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True, name
        for c in containers_of(dep):
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert c["readinessProbe"]["httpGet"]["path"] == "/readyz", name
            assert c["livenessProbe"]["httpGet"]["path"] == "/livez", name
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                if probe not in c:
                    continue
                port = c[probe]["httpGet"]["port"]
                assert port in ports or port in ports.values(), f"{name}: {probe} on unknown port {port}"
            assert {"cpu", "memory"} <= c["resources"]["requests"].keys(), name
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert TELEMETRY_OFF.items() <= env.items(), name
            # out of the Services before SIGTERM, and the drain after it, inside the grace period
            wait = c["lifecycle"]["preStop"]["exec"]["command"]
            assert wait[0] == "sleep" and 0 < int(wait[1]) <= 10, name
            assert pod["spec"].get("terminationGracePeriodSeconds", 30) >= int(wait[1]) + 20, name
    gpu = containers_of(deployments["convnet-serving-gpu"])[0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {e["name"]: e.get("value") for e in gpu["env"]}["CONVNET_DEVICE"] == "auto"
    assert gpu["image"].endswith(":gpu") and containers_of(deployments["convnet-serving"])[0]["image"].endswith(":cpu")
    cpu = containers_of(deployments["convnet-serving"])[0]
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})


def test_every_deployment_sizes_its_workers_for_its_cpu_request():
    """With a CPU request and no limit a pod's processes see every CPU of the node: each Deployment hands the
    service its request (CONVNET_CPUS, rounded up to whole CPUs), and sets no worker or thread count that could
    disagree with it (tests/test_cgroups.py runs the server with CONVNET_CPUS and in a real quota)."""
    for name, dep in resources("Deployment").items():
        for c in containers_of(dep):
            env = {e["name"]: e for e in c.get("env", [])}
            assert env["CONVNET_CPUS"]["valueFrom"]["resourceFieldRef"] == {"resource": "requests.cpu",
                                                                           "divisor": "1"}, name
            assert not {"CONVNET_API_WORKERS", "CONVNET_MODEL_WORKERS", "CONVNET_ORT_THREADS"} & env.keys(), name


def selected(selector: dict[str, str]) -> list[str]:
    """Names of the Deployments whose pods a label selector picks."""
    return [n for n, d in resources("Deployment").items()
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]


def test_services_and_autoscalers_point_at_deployments():
    deployments = resources("Deployment")
    services = resources("Service")
    assert sorted(selected(services["convnet-serving"]["spec"]["selector"])) == ["convnet-serving",
                                                                                 "convnet-serving-gpu"]
    for name, service in services.items():
        matched = selected(service["spec"]["selector"])
        assert matched, f"Service {name} selects no Deployment's pods"
        for port in service["spec"]["ports"]:
            for dep in matched:
                assert port["targetPort"] in {p["name"] for p in containers_of(deployments[dep])[0]["ports"]}
    hpas = resources("HorizontalPodAutoscaler")
    assert {"convnet-serving", "convnet-api", "convnet-models"} <= hpas.keys()
    for hpa in hpas.values():
        assert hpa["apiVersion"] == "autoscaling/v2"
        target = hpa["spec"]["scaleTargetRef"]
        assert target["kind"] == "Deployment" and target["name"] in deployments
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        metric = hpa["spec"]["metrics"][0]["resource"]
        assert metric["name"] == "cpu" and metric["target"]["type"] == "Utilization"
        # Utilisation is relative to the CPU request: without one the HPA cannot compute it.
        assert "cpu" in containers_of(deployments[target["name"]])[0]["resources"]["requests"]


def split_args(deployment: str) -> list[str]:
    return containers_of(resources("Deployment")[deployment])[0]["args"]


def split_env(deployment: str) -> dict[str, str]:
    """The service's own settings (CONVNET_*) a split Deployment's container is given."""
    env = containers_of(resources("Deployment")[deployment])[0].get("env", [])
    return {e["name"]: e["value"] for e in env if e["name"].startswith("CONVNET_") and "value" in e}


def test_split_deployment_wires_api_to_models(bento):
    """The API pods name the model Service (right port) as their `convnet_models` dependency, the model pods serve
    exactly that BentoML service, and only API pods may reach them (service-to-service calls carry pickles)."""
    _, bento_dir = bento
    services_in_bento = {s["name"] for s in yaml.safe_load((bento_dir / "bento.yaml").read_text())["services"]}
    models_args = split_args("convnet-models")
    assert models_args[:3] == ["start-http-server", "--service-name", "convnet_models"]
    assert "convnet_models" in services_in_bento
    api_args = split_args("convnet-api")
    depends = api_args[api_args.index("--depends") + 1]
    dep_name, url = depends.split("=", 1)
    assert dep_name in services_in_bento
    models_service = resources("Service")["convnet-models"]
    assert url == f"http://convnet-models:{models_service['spec']['ports'][0]['port']}"
    assert selected(models_service["spec"]["selector"]) == ["convnet-models"]
    policy = resources("NetworkPolicy")["convnet-models-from-api-only"]
    assert selected(policy["spec"]["podSelector"]["matchLabels"]) == ["convnet-models"]
    sources = [peer["podSelector"]["matchLabels"] for rule in policy["spec"]["ingress"] for peer in rule["from"]]
    assert [selected(s) for s in sources] == [["convnet-api"]]


def test_bentocloud_config_names_real_services_and_fields(bento):
    """deploy/bentocloud.yaml: per-service settings for services that exist, with keys BentoML's client knows
    (its schema ignores unknown keys, so a misspelt one would be silently dropped)."""
    import attrs
    from bentoml._internal.cloud.deployment import DeploymentConfigParameters
    from bentoml._internal.cloud.schemas.modelschemas import DeploymentServiceConfig, DeploymentTargetHPAConf

    _, bento_dir = bento
    services_in_bento = {s["name"] for s in yaml.safe_load((bento_dir / "bento.yaml").read_text())["services"]}
    config = yaml.safe_load((REPO_ROOT / "deploy" / "bentocloud.yaml").read_text())
    assert set(config) <= {f.name for f in attrs.fields(DeploymentConfigParameters)} | {"services"}
    assert set(config["services"]) == services_in_bento
    service_fields = {f.name for f in attrs.fields(DeploymentServiceConfig)}
    scaling_fields = {f.name for f in attrs.fields(DeploymentTargetHPAConf)}
    for name, svc in config["services"].items():
        assert set(svc) <= service_fields, name
        scaling = svc["scaling"]
        assert set(scaling) <= scaling_fields and scaling["min_replicas"] <= scaling["max_replicas"], name
    assert TELEMETRY_OFF.items() <= {e["name"]: e["value"] for e in config["envs"]}.items()


def test_make_setup_stops_when_pyproject_and_lock_disagree(tmp_path):
    """A pin changed in pyproject.toml without `make lock`: `make setup` refuses and names the fix, before it
    installs anything (a scratch copy of the Makefile, pyproject.toml and uv.lock, with the repo's pinned uv)."""
    for name in ("Makefile", "pyproject.toml", "uv.lock"):
        (tmp_path / name).write_bytes((REPO_ROOT / name).read_bytes())
    (tmp_path / ".tools").symlink_to(REPO_ROOT / ".tools")
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"tqdm==4.70.1"', '"tqdm==4.67.1"'))
    out = subprocess.run(["make", "setup"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "UV_OFFLINE": "1"})
    assert out.returncode != 0
    assert "uv.lock does not match pyproject.toml: run `make lock`" in out.stderr, out.stdout + out.stderr
    assert not (tmp_path / ".venv").exists()  # stopped before creating or syncing anything
