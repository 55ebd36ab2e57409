# Thin wrapper: every target calls the `openseek-cpt` CLI, sbatch, or the container engine.
# `make help` lists targets and variables (docs/cluster.md has the same table). Typical cluster session:
#   login node:  make image && make sif;  make download
#   then:        make data;  make train SLURM_NODES=4;  make soup
SHELL := /bin/bash
# The checkout this Makefile lives in; jobs run in the current directory, so
# `make -f /path/to/openseek-cpt/Makefile data` works from any working directory.
REPO := $(patsubst %/,%,$(dir $(abspath $(firstword $(MAKEFILE_LIST)))))

# ---- what to run -----------------------------------------------------------------------------
RECIPE ?= recipes/openseek/config.yaml# recipe YAML of data/train/soup/download (tiny: recipes/tiny/config.yaml)
SET ?=# recipe overrides, space-separated KEY=VALUE (each becomes --set KEY=VALUE)
LOCAL ?=# 1: run data/train/soup here instead of submitting with sbatch
WAIT ?=# 1: sbatch --wait (block until the job ends; its exit status is make's)
# ---- Slurm -----------------------------------------------------------------------------------
SLURM_NODES ?= 1# nodes of the train job (one task per node; world size comes from Slurm)
GPUS_PER_NODE ?= 8# GPUs per train node (0: CPU job, e.g. the tiny recipe)
CPUS_PER_TASK ?=# CPUs per task (empty: the partition default)
PARTITION ?=# sbatch --partition (empty: the cluster default)
ACCOUNT ?=# sbatch --account
TIME ?=# sbatch --time of the submitted job, e.g. 2-00:00:00 (empty: partition default)
SIGNAL_BEFORE ?= 300# seconds before the time limit at which train gets USR1: save, requeue, resume
SBATCH_ARGS ?=# anything else for sbatch, e.g. --qos=high --exclusive
LOGDIR ?= logs# per-job logs: $(LOGDIR)/<job-name>-<job-id>.out
# ---- container -------------------------------------------------------------------------------
RUNTIME ?= $(if $(shell command -v apptainer 2>/dev/null),apptainer,none)# how jobs run: apptainer|pyxis|podman|docker|none (default: apptainer if installed, else none)
FLAVOR ?= gpu# image flavour: gpu (CUDA 12.8 torch 2.10.0) or cpu (torch 2.13.0+cpu)
IMAGE ?= openseek-cpt:$(FLAVOR)# image tag (pyxis: a squashfs path or registry reference)
SIF ?= openseek-cpt.sif# Apptainer image file built by `make sif`
ENGINE ?= $(shell docker info >/dev/null 2>&1 && echo docker || echo podman)# image builder: docker if its daemon answers, else podman
BASE_IMAGE ?=# override the flavour's base image (default debian:bookworm-slim; gpu: nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 works too; a local or mirrored one)
CA_BUNDLE ?=# CA bundle file of a TLS-intercepting proxy, passed to the build as a secret
WHEELS ?=# folder of wheels (e.g. the torch CPU wheel) for the build's pip --find-links (podman)
BUILD_ARGS ?=# extra arguments for `$(ENGINE) build`
MOUNTS ?=# extra bind mounts for every runtime, comma-separated SRC[:DST]
# ---- local Python ----------------------------------------------------------------------------
VENV ?= $(or $(VIRTUAL_ENV),.venv)# venv of tiny/test/LOCAL=1/RUNTIME=none: the active one, else .venv (created by `make tiny` if missing)
WHEEL_DIR ?=# device-wheels: folder the wheels for bench/device/run.sh go to
DEVICE_PY ?= 3.12# device-wheels: Python of the GPU machine (3.12 on the lent one; 3.11 to try it here)
PIP_ARGS ?=# extra pip options for installing the test lock into VENV, e.g. --extra-index-url https://download.pytorch.org/whl/cpu (its torch 2.13.0+cpu is not on PyPI)

PY := $(if $(wildcard $(VENV)/bin/python),$(VENV)/bin/python,python3)
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' $(REPO)/pyproject.toml)
GIT_REV := $(shell git -C $(REPO) rev-parse HEAD 2>/dev/null || echo unknown)
LOCK_gpu := $(REPO)/container/requirements.lock
LOCK_cpu := $(REPO)/container/requirements-cpu.lock
LOCK_test := $(REPO)/container/requirements-test.lock# CI: the CPU lock + test tools + interop readers
BASE_gpu := debian:bookworm-slim# NVIDIA_BASE works too: BASE_IMAGE=$(NVIDIA_BASE)
NVIDIA_BASE := nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
BASE_cpu := debian:bookworm-slim
TORCH_gpu := torch==2.10.0
TORCH_cpu := torch==2.13.0+cpu
TORCH_CPU_INDEX := --extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match
PYVER_gpu := 3.11# Debian bookworm's Python; the GPU lock must resolve the same for NVIDIA's Ubuntu 24.04 (3.12)
PYVER_gpu_nvidia := 3.12
PYVER_cpu := 3.11
OVERRIDES := $(foreach kv,$(SET),--set $(kv))

# Everything the sbatch scripts and runtimes read comes from the environment (sbatch --export=ALL).
export RUNTIME IMAGE SIF MOUNTS
export PATH := $(abspath $(VENV))/bin:$(PATH)
export OPENSEEK_SLURM_DIR := $(REPO)/slurm

SBATCH := sbatch --parsable $(if $(PARTITION),--partition=$(PARTITION)) $(if $(ACCOUNT),--account=$(ACCOUNT)) \
	$(if $(TIME),--time=$(TIME)) $(if $(CPUS_PER_TASK),--cpus-per-task=$(CPUS_PER_TASK)) \
	$(if $(filter 1,$(WAIT)),--wait) --output=$(LOGDIR)/%x-%j.out $(SBATCH_ARGS)
HAVE_SLURM ?= $(shell command -v sbatch 2>/dev/null)# non-empty when sbatch is on PATH; HAVE_SLURM= runs data/train/soup here

.PHONY: help image sif lock device-wheels test-image-gpu test-lock-gpu download data train soup tiny test test-fast
help: ## this list of targets and variables
	@echo "usage: make TARGET [VAR=value ...]"
	@echo "targets:"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## (.*)/\1\t\2/' | awk -F'\t' '{printf "  %-15s %s\n", $$1, $$2}'
	@echo "variables (NAME=default: meaning):"
	@grep -E '^[A-Z_]+ \?=' $(MAKEFILE_LIST) | sed -E 's/^([A-Z_]+) \?= ?([^#]*)# ?(.*)/  \1=\2\n\t\3/' | expand -t 6

image: ## build the image with ENGINE (FLAVOR=gpu|cpu, BASE_IMAGE, CA_BUNDLE, WHEELS, BUILD_ARGS)
	$(ENGINE) build -f $(REPO)/container/Dockerfile -t $(IMAGE) \
	  --build-arg BASE_IMAGE=$(or $(BASE_IMAGE),$(BASE_$(FLAVOR))) --build-arg LOCK=$(patsubst $(REPO)/%,%,$(LOCK_$(FLAVOR))) \
	  --build-arg VERSION=$(VERSION) --build-arg GIT_REV=$(GIT_REV) \
	  --build-arg BUILD_DATE=$$(date -u +%Y-%m-%dT%H:%M:%SZ) \
	  --label org.opencontainers.image.revision=$(GIT_REV) --label org.opencontainers.image.version=$(VERSION) \
	  $(if $(CA_BUNDLE),--secret id=ca_bundle$(,)src=$(abspath $(CA_BUNDLE))) \
	  $(if $(WHEELS),-v $(abspath $(WHEELS)):/wheels:ro --build-arg PIP_FIND_LINKS=/wheels) \
	  $(BUILD_ARGS) $(REPO)

sif: ## convert IMAGE to the Apptainer file SIF (container/openseek-cpt.def, via a docker-archive)
	mkdir -p $(REPO)/build
	rm -f $(REPO)/build/openseek-cpt.tar
	$(ENGINE) save $(if $(filter podman,$(ENGINE)),--format docker-archive) -o $(REPO)/build/openseek-cpt.tar $(IMAGE)
	cd $(REPO) && apptainer build --force $(abspath $(SIF)) container/openseek-cpt.def

lock: ## regenerate the GPU, CPU and test (CI) locks in container/ with uv, hashed
	test -x $(REPO)/build/lock-venv/bin/uv || { python3 -m venv $(REPO)/build/lock-venv && $(REPO)/build/lock-venv/bin/pip install -q uv; }
	cd $(REPO) && $(foreach f,gpu cpu,printf 'setuptools>=68\n$(TORCH_$(f))\n' | build/lock-venv/bin/uv pip compile pyproject.toml - \
	  --generate-hashes --python-platform x86_64-manylinux_2_28 --python-version $(PYVER_$(f)) $(if $(filter gpu,$(f)),--extra gpu) \
	  $(if $(filter cpu,$(f)),$(if $(WHEELS),--find-links $(abspath $(WHEELS)),$(TORCH_CPU_INDEX))) \
	  --custom-compile-command 'make lock' \
	  -o $(LOCK_$(f)) --quiet &&) true
	cd $(REPO) && printf 'setuptools>=68\n$(TORCH_gpu)\n' | build/lock-venv/bin/uv pip compile pyproject.toml - --extra gpu \
	  -c $(LOCK_gpu) --python-platform x86_64-manylinux_2_28 --python-version $(PYVER_gpu_nvidia) --no-header --no-annotate --quiet \
	  | diff - <(sed -n 's/^\([a-z0-9_.-]*==[^ ]*\).*/\1/p' $(LOCK_gpu)) \
	  || { echo "make lock: $(notdir $(LOCK_gpu)) resolves differently for Python $(PYVER_gpu_nvidia) (NVIDIA's base)"; exit 1; }
	cd $(REPO) && printf 'setuptools>=68\n$(TORCH_cpu)\nmegatron-core==0.16.1\n' | build/lock-venv/bin/uv pip compile pyproject.toml - \
	  --extra test --extra mindspore -c $(LOCK_cpu) --generate-hashes --python-platform x86_64-manylinux_2_28 --python-version $(PYVER_cpu) \
	  $(if $(WHEELS),--find-links $(abspath $(WHEELS)),$(TORCH_CPU_INDEX)) --custom-compile-command 'make lock' -o $(LOCK_test) --quiet

device-wheels: ## download bench/device/wheels.txt for a GPU machine without network (WHEEL_DIR, DEVICE_PY)
	$(if $(WHEEL_DIR),,$(error make device-wheels: set WHEEL_DIR=folder for the wheels))
	mkdir -p $(WHEEL_DIR) && grep -Ev '^\s*(#|$$)' $(REPO)/bench/device/wheels.txt | xargs $(PY) -m pip download -q --no-deps \
	  --only-binary=:all: --implementation cp --python-version $(DEVICE_PY) --platform manylinux_2_28_x86_64 \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d $(WHEEL_DIR)
	du -sh $(WHEEL_DIR)

test-image-gpu: ## build openseek-cpt:gpu (podman, Debian base) and check it inside: CUDA, cuDNN, NCCL, Triton, tiny, lever tests
	cd $(REPO) && $(PY) -m pytest -q -m container tests/cluster/test_image_gpu.py

test-lock-gpu: ## install the GPU lock in a scratch venv (--require-hashes), pip check, CUDA 12.8 + cuDNN 9 load
	rm -rf $(REPO)/build/gpu-lock-venv && python3 -m venv $(REPO)/build/gpu-lock-venv
	$(REPO)/build/gpu-lock-venv/bin/pip install -q --no-deps --require-hashes -r $(LOCK_gpu)
	$(REPO)/build/gpu-lock-venv/bin/pip install -q --no-deps --no-index --no-build-isolation $(REPO)
	$(REPO)/build/gpu-lock-venv/bin/pip check
	$(REPO)/build/gpu-lock-venv/bin/python -c "import torch; v = torch.backends.cudnn.version(); \
	  print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cuDNN', v, 'NCCL', torch.cuda.nccl.version()); \
	  assert torch.version.cuda == '12.8' and v // 10000 == 9"
	rm -rf $(REPO)/build/gpu-lock-venv


download: ## fetch base model + tokenizer into assets.model_dir (run where the network is)
	openseek-cpt download --recipe $(RECIPE) $(OVERRIDES)

data: ## prepare the dataset (CPU job; LOCAL=1 runs it here)
	$(call here_or_sbatch,data,--job-name=openseek-data)

train: ## train on SLURM_NODES nodes x GPUS_PER_NODE (LOCAL=1: this machine, accelerate launch)
	$(call check_count,train,SLURM_NODES,1,the number of nodes (e.g. SLURM_NODES=4))$(call check_count,train,GPUS_PER_NODE,0,GPUs per node (e.g. \
	  GPUS_PER_NODE=8; 0 for a CPU job))$(call check_count,train,SIGNAL_BEFORE,0,seconds (e.g. 300))
	$(if $(and $(filter here,$(WHERE)),$(filter-out 1,$(SLURM_NODES))),$(error make train: SLURM_NODES=$(SLURM_NODES) needs Slurm, \
	  but $(if $(HAVE_SLURM),LOCAL=1 runs on this machine only,sbatch is not on PATH here); run it on the cluster's login node, or SLURM_NODES=1 LOCAL=1 to train here))
	$(call here_or_sbatch,launch,--job-name=openseek-train --nodes=$(SLURM_NODES) --ntasks-per-node=1 \
	  $(if $(filter-out 0,$(GPUS_PER_NODE)),--gpus-per-node=$(GPUS_PER_NODE)) --signal=B:USR1@$(SIGNAL_BEFORE),train)

soup: ## average base + checkpoints into soup.output_dir (CPU job; LOCAL=1 runs it here)
	$(call here_or_sbatch,soup,--job-name=openseek-soup)

tiny: $(VENV)/bin/openseek-cpt ## the whole pipeline on the tiny recipe on this CPU (creates VENV if needed)
	$(VENV)/bin/openseek-cpt tiny $(OVERRIDES)

test: $(VENV)/bin/openseek-cpt ## the test suite (README's test command; creates VENV like `tiny` if missing)
	cd $(REPO) && $(abspath $(VENV))/bin/python -m pytest -q tests

test-fast: $(VENV)/bin/openseek-cpt ## the unit tier: no CLI runs end to end, no cluster or image (minutes)
	cd $(REPO) && $(abspath $(VENV))/bin/python -m pytest -q -m "not e2e and not slurm and not container" tests

# The venv of tiny/test/LOCAL=1, created once from the hashed test lock exactly as .ci/run installs it
# (tests/test_release.py compares the two), so `make tiny`/`make test` run the stack CI tested.
$(VENV)/bin/openseek-cpt:
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q $(PIP_ARGS) --require-hashes -r $(LOCK_test)
	$(VENV)/bin/pip install -q --no-deps -e $(REPO)
	$(VENV)/bin/pip check

# Where data/train/soup run: here with LOCAL=1 or when this machine has no sbatch, else a Slurm job.
WHERE = $(if $(filter 1,$(LOCAL)),here,$(if $(HAVE_SLURM),sbatch,here))
RUNTIMES := apptainer singularity pyxis podman docker none
# $(call here_or_sbatch,CLI_STAGE,SBATCH_OPTIONS[,SCRIPT]): `openseek-cpt CLI_STAGE` here, or sbatch
# slurm/SCRIPT.sbatch (default: CLI_STAGE) with RUNTIME checked before anything is queued.
here_or_sbatch = $(call check_job_vars,$@)$(if $(filter here,$(WHERE)),$(if $(LOCAL),,$(info no sbatch on PATH: running here (as LOCAL=1))) \
  openseek-cpt $(1) --recipe $(RECIPE) $(OVERRIDES),$(if $(filter $(RUNTIME),$(RUNTIMES)),,$(error \
  RUNTIME=$(RUNTIME) is not one of $(RUNTIMES); fix the spelling (nothing was submitted))) \
  mkdir -p $(LOGDIR) && $(SBATCH) $(2) $(REPO)/slurm/$(or $(3),$(1)).sbatch $(RECIPE) $(OVERRIDES))

# Variables a job reads, checked before anything runs or is queued: one line naming the variable, its
# value and what it takes (make exits 2; a bad value would otherwise fail on a compute node later).
strip_digits = $(subst 0,,$(subst 1,,$(subst 2,,$(subst 3,,$(subst 4,,$(subst 5,,$(subst 6,,$(subst 7,,$(subst 8,,$(subst 9,,$(1)))))))))))
# $(call check_count,TARGET,VAR,MIN,WHAT): VAR must be one whole number >= MIN (MIN: 0 or 1); WHAT has no commas.
check_count = $(if $(and $(filter 1,$(words $($(2)))),$(if $(call strip_digits,$($(2))),,digits),$(if $(filter 1,$(3)),$(subst \
  0,,$($(2))),any)),,$(error make $(1): $(2)=$($(2)) is not a whole number >= $(3); give $(4) (nothing was submitted)))
check_flag = $(if $(filter-out 0 1,$($(2))),$(error make $(1): $(2)=$($(2)) must be 1 (or empty/0 for off) (nothing was submitted)))
check_job_vars = $(if $(wildcard $(RECIPE)),$(if $(wildcard $(RECIPE)/.),$(error make $(1): RECIPE=$(RECIPE) is a directory, \
  not a recipe file; give RECIPE=path/to/config.yaml (nothing was submitted))),$(error make $(1): RECIPE=$(RECIPE) does not exist \
  (from $(CURDIR)); give RECIPE=path/to/config.yaml, e.g. recipes/tiny/config.yaml (nothing was submitted)))$(call \
  check_flag,$(1),LOCAL)$(call check_flag,$(1),WAIT)$(if $(CPUS_PER_TASK),$(call check_count,$(1),CPUS_PER_TASK,1,CPUs per task (e.g. 16)))

, := ,
