# `make test` is the one command CI runs: it builds the venv when missing and installs what changed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint format demo clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip==25.3

# Reinstall only when the packaging files or the C++ sources change.
$(STAMP): $(BIN)/python setup.py pyproject.toml $(wildcard csrc/*.cpp)
	@echo "[install 1/2] torch==2.13.0 (the CPU wheel, a download of a few hundred MB) ..."
	$(BIN)/pip install --progress-bar on torch==2.13.0
	@echo "[install 2/2] megatiny[dev] and its dependencies, building the C++ helpers ..."
	$(BIN)/pip install --progress-bar on -e '.[dev]'
	touch $(STAMP)
	@echo "[install] done: $(VENV)"

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest -q

test-fast: lint
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info megatiny/*.so

# The README's first command: the venv, the real Shakespeare corpus + tokenizer, a tiny GPT trained
# with tp=2 on 2 CPU ranks under torchrun (600 steps; the time: README.md), validation
# loss/perplexity, then samples.
demo: $(STAMP)
	@echo "[demo 1/3] data: Shakespeare -> pipeline -> tokenizer -> .demo/data (skipped when present)"
	launch/prepare_demo_data.sh .demo
	rm -rf .demo/run
	@echo "[demo 2/3] training 600 steps, tp=2 on 2 CPU ranks (a progress bar follows)"
	NPROC=2 PYTHON=$(BIN)/python launch/run_local.sh --config launch/configs/tiny-cpu.yaml
	@echo "[demo 3/3] sampling"
	@echo; echo "== samples from the trained model (megatiny generate) =="
	@seed=0; for prompt in "HAMLET." "ROMEO." "KING HENRY." ; do \
	  seed=$$((seed + 1)); \
	  $(BIN)/megatiny generate --checkpoint .demo/run --tokenizer .demo/tokenizer \
	    --prompt "$$prompt" --max-new-tokens 60 --temperature 1.0 --top-p 0.95 --seed $$seed || exit 1; \
	  echo "----"; \
	done
	@echo "run dir:    .demo/run   (resolved config: .demo/run/config.yaml)"
	@echo "metrics:    .demo/run/metrics.jsonl   (tensorboard --logdir .demo/run/tensorboard)"
	@echo "checkpoint: .demo/run/checkpoints/$$(cat .demo/run/checkpoints/latest)"
