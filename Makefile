# finetune-operator: the two commands are `make demo` and `make test`.
# Every target installs what it needs; caches live outside the repo
# (~/.cache/finetune-operator, or $FINETUNE_CACHE).

SHELL := /bin/bash
PYTHON_BOOTSTRAP ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
PYTEST_ARGS ?=


.PHONY: system-packages
.PHONY: check-webui-loaders check-fresh-install images check-images
.PHONY: help setup binaries test-binaries lint test test-unit test-fast crds crds-check demo cluster-up cluster-down \
        bench bench-trainer gpu-check chart-docs clean

help:
	@echo "make demo          run a tiny fine-tune on a local control plane, end to end (KUEUE=1: two jobs through Kueue, one GPU of quota)"
	@echo "make test          lint, then every test (unit, cluster, trainer, end to end)"
	@echo "make setup         create .venv (dependencies cached in ~/.cache/finetune-operator)"
	@echo "make lint          ruff + mypy + hadolint"
	@echo "make crds          regenerate crds/ and the chart's CRD from the API models"
	@echo "make cluster-up    start the local control plane (KUBECONFIG=.cluster/kubeconfig; KUEUE=1 adds Kueue;"
	@echo "                   REAL_NODE=1 adds a node run by a real kubelet with the images make images built)"
	@echo "make cluster-down  stop it"
	@echo "make bench         operator-at-scale benchmark (results in bench/results/)"
	@echo "make bench-trainer trainer step benchmark (results in bench/results/)"
	@echo "make gpu-check     one short run of each GPU-only path (results in bench/results/gpu-check.md; no GPU: the plan)"
	@echo "make check-webui-loaders  our exports through InvokeAI's model probe and loader (own venv, ~4 min; ~8 min cold)"
	@echo "make check-fresh-install  pip install '.[trainer]' unconstrained, then a tiny LoRA with text encoders"
	@echo "make images        build the operator and trainer images with podman (REGISTRY=, TAG=; PUSH=1 pushes them)"
	@echo "make check-images  run the images as a cluster would: the demo job as its pod, the operator as the chart's"

setup: $(VENV)/.finetune-ready

$(VENV)/.finetune-ready: pyproject.toml constraints.txt scripts/setup_env.py
	@$(PYTHON_BOOTSTRAP) scripts/check_prerequisites.py setup
	$(PYTHON_BOOTSTRAP) scripts/setup_env.py
	@touch $@

# What each target needs, and only that: the control plane; Kueue's manager with KUEUE=1 (about
# 9 minutes to build cold); make test also Helm and Kueue (their tests).
CONTROL_PLANE := etcd kube-apiserver kube-controller-manager kube-scheduler
# What a node of a real kubelet needs beside the kubelet (built like the control plane): REAL_NODE=1.
REAL_NODE_PACKAGES := containerd runc /usr/lib/cni/bridge:containernetworking-plugins
binaries: setup
	@$(PY) scripts/check_prerequisites.py cluster
	$(PY) -m finetune_devcluster.binaries $(CONTROL_PLANE) $(if $(KUEUE),kueue,) $(if $(REAL_NODE),kubelet,)

test-binaries: setup
	@$(PY) scripts/check_prerequisites.py cluster
	$(PY) -m finetune_devcluster.binaries $(CONTROL_PLANE) helm kueue

lint: setup
	$(VENV)/bin/ruff check api operator trainer-image devcluster tests bench scripts
	$(VENV)/bin/ruff format --check api operator trainer-image devcluster tests bench scripts
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint --config trainer-image/.hadolint.yaml trainer-image/Dockerfile operator/Dockerfile

crds: setup
	$(PY) -m finetune_api.crd crds/finetunejobs.finetune.dev.yaml helm/finetune-operator/crds/finetunejobs.finetune.dev.yaml
	$(PY) -m finetune_api.policy crds/immutable-spec.finetune.dev.yaml helm/finetune-operator/crds/immutable-spec.finetune.dev.yaml
	$(PY) -m finetune_api.job_policy crds/job-policy.finetune.dev.yaml helm/finetune-operator/crds/job-policy.finetune.dev.yaml

crds-check: setup
	$(PY) -m finetune_api.crd --check crds/finetunejobs.finetune.dev.yaml
	$(PY) -m finetune_api.policy --check crds/immutable-spec.finetune.dev.yaml
	$(PY) -m finetune_api.job_policy --check crds/job-policy.finetune.dev.yaml

# Tests start the binaries they need; building them first keeps the build out
# of the timed parts of the run.
test: lint test-binaries system-packages
	$(PY) -m pytest $(PYTEST_ARGS)

system-packages:
	scripts/ensure_system_packages.sh

test-unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

demo: setup binaries
	$(if $(REAL_NODE),scripts/ensure_system_packages.sh podman $(REAL_NODE_PACKAGES),)
	$(PY) -m finetune_devcluster.demo $(if $(KEEP),--keep,) $(if $(KUEUE),--kueue,) $(if $(REAL_NODE),--real-node,)

cluster-up: setup binaries
	$(if $(REAL_NODE),scripts/ensure_system_packages.sh podman $(REAL_NODE_PACKAGES),)
	$(PY) -m finetune_devcluster up $(if $(KUEUE),--kueue,) $(if $(REAL_NODE),--real-node,)

cluster-down: setup
	$(PY) -m finetune_devcluster down

bench: setup
	$(PY) bench/operator_scale.py

bench-trainer: setup
	$(PY) bench/trainer_step.py $(BENCH_ARGS)

# The first thing to run on a GPU: bf16/fp16, SDXL with text encoders at 1024 px, Flux.1 on an nf4
# base (a folder and a single file), the kohya export, 8-bit AdamW, xformers, torch.compile.
gpu-check: setup
	$(PY) bench/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	-$(PY) -m finetune_devcluster down
	rm -rf .cluster .pytest_cache .mypy_cache .ruff_cache

chart-docs: setup
	$(PY) scripts/chart_docs.py

# InvokeAI (from PyPI, in a venv of its own in ~/.cache/finetune-operator) identifies and loads the
# single file, the diffusers folder and the LoRA files our exporters write: see
# trainer-image/README.md, "Checked by a web UI's own loader".
check-webui-loaders: setup
	$(PY) scripts/webui_loaders.py

# The README's workstation install, pip install '.[trainer]' with no constraints, as the package
# index resolves it today, then a tiny LoRA with text encoders (scripts/fresh_install.py).
check-fresh-install: setup
	$(PY) scripts/fresh_install.py

# The two images, with podman, tagged as the chart's values expect (REGISTRY= and TAG= name another
# place; PUSH=1 pushes them). Where debian:bookworm-slim cannot be pulled, a base made from
# Debian's packages stands in (finetune_devcluster/images.py).
images: setup
	scripts/ensure_system_packages.sh podman runc debootstrap
	$(PY) -m finetune_devcluster.images $(if $(PUSH),--push,)

# The images run as a cluster runs them (tests/images): the demo job in the trainer image as the
# pod the operator renders, the operator image as the chart's Deployment against the dev cluster.
check-images: setup
	scripts/ensure_system_packages.sh podman $(REAL_NODE_PACKAGES)
	$(PY) -m finetune_devcluster.binaries $(CONTROL_PLANE) helm kubelet
	FINETUNE_IMAGE_TESTS=1 $(PY) -m pytest tests/images $(PYTEST_ARGS)
