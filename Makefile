# The two commands of the README: `make demo` and `make test`. Both create .venv when missing.
#
# They install the exact versions CI last tested (constraints.txt; constraints-ppo.txt for the PPO environment), so
# `make test` passes on any machine on any day. `make test-latest` tests the newest versions pyproject.toml allows,
# in .venv-latest; `make lock` runs it and, if it passes, writes those versions into the constraints files.
VENV ?= .venv
LATEST_VENV ?= .venv-latest
CONSTRAINTS ?= constraints.txt
# TRL's PPOTrainer exists up to TRL 1.12 only: its tests run in a second environment pinned to it.
PPO_VENV ?= .venv-ppo
LATEST_PPO_VENV ?= .venv-ppo-latest
PPO_CONSTRAINTS ?= constraints-ppo.txt
PPO_TRL ?= trl==1.12.0
PYTHON ?= python3
# torch first: on the project's machines pip takes the CPU wheel from local disk. It is pinned here, not in the
# constraints files, so `make TORCH=torch==2.x.y ...` can choose another.
TORCH ?= torch==2.13.0
EXTRAS ?= trl,peft,dev,bench,deepspeed
export OMP_NUM_THREADS ?= 1
# What pip freeze lists of an environment, as constraints: no editable hf_r8, no torch (TORCH pins it).
FREEZE = bin/pip freeze --exclude-editable | grep -v -i -e '^torch==' -e '^hf.r8'

.PHONY: install demo test test-ppo lint bench bench-quick test-latest lock notebook

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet "$(TORCH)"
	$(VENV)/bin/pip install --quiet -c $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

$(PPO_VENV)/.installed: pyproject.toml $(PPO_CONSTRAINTS)
	$(PYTHON) -m venv $(PPO_VENV)
	$(PPO_VENV)/bin/pip install --quiet "$(TORCH)"
	$(PPO_VENV)/bin/pip install --quiet -c $(PPO_CONSTRAINTS) "$(PPO_TRL)" -e ".[dev]"
	touch $@

demo: install
	$(VENV)/bin/hf-r8 demo

# Re-execute the notebook in place (offline, the demo's settings): its committed outputs show the current default.
notebook: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/jupyter execute --inplace notebooks/gpt2_wikitext.ipynb

lint: install
	$(VENV)/bin/ruff check .

test: lint
	$(VENV)/bin/python -m pytest -q
	$(MAKE) test-ppo

test-ppo: $(PPO_VENV)/.installed
	$(PPO_VENV)/bin/python -m pytest -q tests/test_trl_ppo.py

# The newest versions pyproject.toml allows, installed afresh each time: upstream drift is found here first.
test-latest:
	rm -rf $(LATEST_VENV) $(LATEST_PPO_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install --quiet "$(TORCH)"
	$(LATEST_VENV)/bin/pip install --quiet -e ".[$(EXTRAS)]"
	$(PYTHON) -m venv $(LATEST_PPO_VENV)
	$(LATEST_PPO_VENV)/bin/pip install --quiet "$(TORCH)"
	$(LATEST_PPO_VENV)/bin/pip install --quiet "$(PPO_TRL)" -e ".[dev]"
	$(LATEST_VENV)/bin/ruff check .
	$(LATEST_VENV)/bin/python -m pytest -q
	$(LATEST_PPO_VENV)/bin/python -m pytest -q tests/test_trl_ppo.py

# Refresh the pins: what test-latest installed and passed on becomes what `make test` installs.
lock: test-latest
	$(LATEST_VENV)/$(FREEZE) > $(CONSTRAINTS)
	$(LATEST_PPO_VENV)/$(FREEZE) > $(PPO_CONSTRAINTS)

# LR robustness sweep (bench/README.md): quick ~30 min on 2 cores (4 tasks x 11 methods); full takes hours.
bench-quick: install
	$(VENV)/bin/python bench/lr_sweep.py --quick

bench: install
	$(VENV)/bin/python bench/lr_sweep.py
