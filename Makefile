# convnet-serving. Every target installs what it needs into .venv from a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PORT ?= 3000
export BENTOML_DO_NOT_TRACK := true
export ORT_DISABLE_TELEMETRY := 1
export PYTHONDONTWRITEBYTECODE := 1
# glibc malloc for the service: keeps a serving worker's RSS flat under large uploads (docs/hardening.md; the same
# values are in the bentofiles, deploy/ and tests/serverproc.py). Set where the server starts, not for training.
ALLOCATOR_ENV := MALLOC_ARENA_MAX=2 MALLOC_MMAP_THRESHOLD_=1048576 MALLOC_TRIM_THRESHOLD_=8388608

.PHONY: setup lock models serve test lint train-lenet clean help

help:
	@echo "make serve        build the default models if missing and serve them on 127.0.0.1:$(PORT)"
	@echo "make test         run the whole test suite (what CI runs)"
	@echo "make models       build models/ (LeNet-5 is shipped; AlexNet's ONNX is built here)"
	@echo "make alexnet-official  rebuild AlexNet from torchvision's weights (ALEXNET_WEIGHTS=..., or DOWNLOAD=1)"
	@echo "make train-lenet  train LeNet-5 on MNIST (MNIST_DIR=...) and export it to models/lenet5"
	@echo "make lint         ruff"
	@echo "make lock         re-resolve uv.lock on purpose and re-export deploy/requirements.*.txt"
	@echo "make loadtest     start the service, run Locust for 60 s, fail on any error (LOADTEST_ARGS=...)"
	@echo "make soak         10 min at ~80% of capacity, good and bad uploads; writes docs/soak.md"
	@echo "make bench        measure onnxruntime, the service and the baselines; writes docs/benchmarks.md"
	@echo "make batch-bench  the batch CLI against onnxruntime in process, and its memory; numbers in docs/batch.md"
	@echo "make bento        build the bento (front + model service) from bentofile.yaml (VARIANT=gpu: bentofile.gpu.yaml)"
	@echo "make container    the bento as an OCI image (IMAGE=..., CONTAINER_BACKEND=...); make container-run serves it"
	@echo "make test-container  build and test the image (docs/deploy.md)"
	@echo "make experiments  ReLU vs sigmoid, dropout vs over-fitting on MNIST: docs/experiments/*.png (MNIST_DIR=...)"

# Dependencies: uv.lock pins every package of every group (versions and hashes); `make setup` installs exactly that
# and stops if pyproject.toml has changed without `make lock`. uv itself is pinned and bootstrapped with pip.
UV_VERSION := 0.13.9
TOOLS := .tools
UV := $(TOOLS)/bin/uv
export UV_PYTHON := $(PYTHON)
export UV_PYTHON_DOWNLOADS := never
# The machine's CA bundle (a TLS-intercepting proxy may sit in front of the package index).
export SSL_CERT_FILE ?= $(wildcard /etc/ssl/certs/ca-certificates.crt)
SYNC_ARGS := --frozen --extra gpu

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install -q --disable-pip-version-check uv==$(UV_VERSION)

$(STAMP): pyproject.toml uv.lock | $(UV)
	@$(UV) lock --check -q || { echo >&2; echo "uv.lock does not match pyproject.toml: run \`make lock\` (it re-resolves on" \
	  "purpose and rewrites deploy/requirements.*.txt), then commit both." >&2; exit 1; }
	$(UV) sync $(SYNC_ARGS)
	touch $@

setup: $(STAMP)

# Re-resolve on purpose (new or upgraded dependency), then export the images' requirements from the same lock.
# Image files carry exact versions without hashes: BentoML appends its own unhashed bentoml pin to them.
# The lock's platform marker is dropped: an image built for another platform then fails on a missing wheel, loudly.
EXPORT := $(UV) export --frozen --no-hashes --no-default-groups --no-emit-project --no-header
NO_MARKER := sed "s/ ; platform_machine == 'x86_64' and sys_platform == 'linux'//"
lock: | $(UV)
	$(UV) lock
	@{ echo "# Exported from uv.lock by \`make lock\` (cpu extra: onnxruntime CPU build). Do not edit by hand."; \
	  $(EXPORT) --extra cpu | $(NO_MARKER); } > deploy/requirements.cpu.txt
	@{ echo "# Exported from uv.lock by \`make lock\` (cuda extra: onnxruntime-gpu with CUDA/cuDNN wheels). Do not edit."; \
	  $(EXPORT) --extra cuda | $(NO_MARKER); } > deploy/requirements.gpu.txt
	$(UV) sync $(SYNC_ARGS)
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .

# --- model repository -------------------------------------------------------------------------------------------
# LeNet-5 is trained and committed (models/lenet5). AlexNet's ONNX (~233 MB) is built here: from torchvision's official
# weights when the file is at ALEXNET_WEIGHTS, otherwise from a seeded initialisation labelled "untrained-demo".
ALEXNET_WEIGHTS ?= data/alexnet-owt-7be5be79.pth
MNIST_DIR ?= ../shared/data/mnist
.PHONY: alexnet-official

models: setup models/lenet5/1/model.onnx models/alexnet/1/model.onnx models/alexnet/1/model.fp16.onnx

models/lenet5/1/model.onnx:
	@echo "models/lenet5 is part of the repository: restore it with git checkout, or rebuild it with make train-lenet"; exit 1

models/alexnet/1/model.onnx: | $(STAMP)
	@if [ -f "$(ALEXNET_WEIGHTS)" ]; then \
	  $(PY) -m training.import_weights "$(ALEXNET_WEIGHTS)" --output runs/alexnet/imported.pt && \
	  $(PY) -m training.export --checkpoint runs/alexnet/imported.pt; \
	else \
	  echo "AlexNet: no official weights at $(ALEXNET_WEIGHTS): building an UNTRAINED demo model (see README)"; \
	  $(PY) -m training.export --model alexnet --seed 0; \
	fi

# AlexNet's float16 copy for GPUs (docs/models.md): converted from the float32 file, checked against it on CPU, and
# recorded in the card and config.pbtxt; rebuilt whenever the float32 file is.
models/alexnet/1/model.fp16.onnx: models/alexnet/1/model.onnx | $(STAMP)
	$(PY) -m training.fp16 models/alexnet

# Rebuild AlexNet (and its float16 copy) from the official weights (download them first with DOWNLOAD=1 if you have
# a network).
alexnet-official: setup
	$(if $(DOWNLOAD),$(PY) -m training.import_weights --download "$(ALEXNET_WEIGHTS)" --output runs/alexnet/imported.pt,$(PY) -m training.import_weights "$(ALEXNET_WEIGHTS)" --output runs/alexnet/imported.pt)
	$(PY) -m training.export --checkpoint runs/alexnet/imported.pt --precision fp16

# Train LeNet-5 on MNIST (docs/training.md: <= 0.8% test error, a few minutes on 2 CPU cores), then export best.pt
# to models/lenet5 (the exporter re-measures the error through the serving preprocessing and writes the card).
LENET_TRAIN_ARGS ?= --epochs 20 --batch-size 64 --lr 0.05 --lr-scheduler onecycle --weight-decay 5e-4 --distort --threads 1 --seed 0
train-lenet: setup
	$(PY) -m training.train --model lenet5 --data-dir $(MNIST_DIR) --output-dir runs/lenet5 $(LENET_TRAIN_ARGS)
	$(PY) -m training.export --checkpoint runs/lenet5/best.pt --mnist-dir $(MNIST_DIR)

# The article's claims as measured plots (docs/experiments.md): vanishing gradients, training speed, over-fitting and
# dropout, dropout off at inference. Writes docs/experiments/*.png and results.json; seeded; ~5 min idle, 17 min loaded.
# EXPERIMENTS_ARGS="--quick" is CI's ~1-minute budget (tests/test_experiments.py runs it into a temporary folder).
EXPERIMENTS_ARGS ?=
.PHONY: experiments
experiments: setup
	$(PY) -m training.experiments --data-dir $(MNIST_DIR) --out docs/experiments $(EXPERIMENTS_ARGS)

# --- the service (docs/service.md) -----------------------------------------------------------------------------------
# Every model in models/ on 127.0.0.1:$(PORT); tunables are CONVNET_* variables or a TOML file in CONVNET_CONFIG.
serve: models
	@echo "Demo page (classify a photo or a drawn digit): http://127.0.0.1:$(PORT)/demo   API docs: http://127.0.0.1:$(PORT)/"
	$(ALLOCATOR_ENV) $(VENV)/bin/bentoml serve serving.service:Convnet --host 127.0.0.1 --port $(PORT)

# --- tests ---------------------------------------------------------------------------------------------------------
# The whole suite. What it drives from Debian is installed when missing (scripts/apt-tools.sh): the container test's
# buildah/podman/runc/debootstrap, the demo page test's Chromium (driven by Playwright), avifenc (a 10-bit AVIF for
# the format tests: Pillow's encoder is 8-bit only) and wrk (the benchmark harness test).
# Two passes: most files on TEST_PROCS processes (pytest-xdist, a whole file to a process, so a file's fixtures are
# set up once), then the files marked `serial` (they time, load or measure the machine) alone. pytest's exit 5 ("no
# tests collected") is a failure when both passes collect nothing (PYTEST_ARGS=tests/test_x.py runs one file).
PYTEST_ARGS ?=
TEST_PROCS ?= 2
CONTAINER_TOOLS := buildah=buildah podman=podman runc=runc debootstrap=debootstrap
.PHONY: container-tools test-tools
container-tools:
	@bash scripts/apt-tools.sh $(CONTAINER_TOOLS)

test-tools:
	@bash scripts/apt-tools.sh $(CONTAINER_TOOLS) chromium=chromium avifenc=libavif-bin wrk=wrk

test: models test-tools
	@$(PY) -m pytest -n $(TEST_PROCS) --dist loadfile -m "not serial" $(PYTEST_ARGS); a=$$?; \
	$(PY) -m pytest -m serial $(PYTEST_ARGS); b=$$?; \
	if [ $$a -eq 5 ] && [ $$b -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; \
	for rc in $$a $$b; do if [ $$rc -ne 0 ] && [ $$rc -ne 5 ]; then exit $$rc; fi; done

# --- containers (docs/deploy.md) -----------------------------------------------------------------------------------
# VARIANT=cpu (slim image, onnxruntime CPU) or gpu (same base + onnxruntime-gpu with CUDA/cuDNN pip wheels).
# CONTAINER_BACKEND: auto = docker when an engine answers, else the offline buildah/podman fallback (scripts/oci/).
VARIANT ?= cpu
CONTAINER_BACKEND ?= auto
BENTOFILE := $(if $(filter gpu,$(VARIANT)),bentofile.gpu.yaml,bentofile.yaml)
BENTO_NAME := convnet-serving$(if $(filter gpu,$(VARIANT)),-gpu,)
IMAGE ?= convnet-serving:$(VARIANT)
BENTOML_HOME ?= $(CURDIR)/.bentoml
.PHONY: bento container container-run test-container

# The bento carries the whole service graph (front + model service: split pods, BentoCloud, GPUs); at run time each
# process's CONVNET_PLACEMENT decides which it uses (auto: everything in front on CPU).
bento: setup models
	CONVNET_PLACEMENT=model_service BENTOML_HOME="$(BENTOML_HOME)" $(VENV)/bin/bentoml build -f $(BENTOFILE) .

container: bento
	BENTOML_HOME="$(BENTOML_HOME)" BENTOML="$(CURDIR)/$(VENV)/bin/bentoml" \
	  scripts/oci/containerize.sh $(BENTO_NAME):latest $(IMAGE) $(CONTAINER_BACKEND)

container-run: setup
	scripts/oci/run.sh $(IMAGE) $(PORT) $(if $(filter buildah,$(CONTAINER_BACKEND)),podman,$(CONTAINER_BACKEND))

test-container: models container-tools
	$(PY) -m pytest -m container tests/test_container.py

# --- load tests and benchmarks (docs/loadtests.md) ------------------------------------------------------------------
# make loadtest: the service started on a free 127.0.0.1 port, Locust for a bounded time, SLOs checked (exit 1 on a
# miss); LOADTEST_ARGS replaces the defaults, e.g. LOADTEST_ARGS="--sweep 1,2,4,8,16,32,64 --step-time 20s".
# make bench: every number in docs/benchmarks.md in one run (~6.5 min on 2 cores); needs wrk (apt-get install wrk).
LOADTEST_ARGS ?= --users 8 --run-time 60s --max-failure-ratio 0
BENCH_ARGS ?=
.PHONY: loadtest bench wrk

loadtest: setup models
	$(PY) -m loadtests.run --start-server $(LOADTEST_ARGS)

# make soak: 10 minutes at ~80% of the measured capacity, good and bad uploads on both models; fails on any
# unexpected status; the table (p99 and every worker's RSS per 30 s) goes to docs/soak.md. Not in CI (a 30 s
# version is: tests/test_soak.py).
SOAK_ARGS ?= --duration 600 --write docs/soak.md
.PHONY: soak
soak: setup models
	$(PY) -m loadtests.soak $(SOAK_ARGS)

wrk:
	@bash scripts/apt-tools.sh wrk=wrk

bench: setup models wrk
	$(PY) -m loadtests.bench $(BENCH_ARGS)

# make batch-bench: the batch CLI against onnxruntime in-process (AlexNet, 500x375 JPEGs) and its peak RSS at 1k vs
# 10k inputs (LeNet-5); numbers in docs/batch.md. BATCH_BENCH_ARGS e.g. "throughput --images 1024 --rounds 5".
BATCH_BENCH_ARGS ?= all --json results/batch_bench.json
.PHONY: batch-bench
batch-bench: setup models
	$(PY) -m loadtests.batch_bench $(BATCH_BENCH_ARGS)
