# The two commands of the README: `make demo` and `make test`. Both create .venv when missing.
VENV ?= .venv
# TRL's PPOTrainer exists up to TRL 1.12 only: its tests run in a second environment pinned to it.
PPO_VENV ?= .venv-ppo
PPO_TRL ?= trl==1.12.0
PYTHON ?= python3
# torch first: on the project's machines pip takes the CPU wheel from local disk.
TORCH ?= torch==2.13.0
export OMP_NUM_THREADS ?= 1

.PHONY: install demo test test-ppo lint bench bench-quick

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet "$(TORCH)"
	$(VENV)/bin/pip install --quiet -e ".[trl,peft,dev,bench,deepspeed]"
	touch $@

install: $(VENV)/.installed

$(PPO_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(PPO_VENV)
	$(PPO_VENV)/bin/pip install --quiet "$(TORCH)"
	$(PPO_VENV)/bin/pip install --quiet "$(PPO_TRL)" -e ".[dev]"
	touch $@

demo: install
	$(VENV)/bin/hf-r8 demo

lint: install
	$(VENV)/bin/ruff check .

test: lint
	$(VENV)/bin/python -m pytest -q
	$(MAKE) test-ppo

test-ppo: $(PPO_VENV)/.installed
	$(PPO_VENV)/bin/python -m pytest -q tests/test_trl_ppo.py

# LR robustness sweep (bench/README.md): quick ~25 min on 2 cores (3 tasks x 11 methods); full takes hours.
bench-quick: install
	$(VENV)/bin/python bench/lr_sweep.py --quick

bench: install
	$(VENV)/bin/python bench/lr_sweep.py
