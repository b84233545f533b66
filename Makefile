# The two commands of the README: `make demo` and `make test`. Both create .venv when missing.
VENV ?= .venv
PYTHON ?= python3
# torch first: on the project's machines pip takes the CPU wheel from local disk.
TORCH ?= torch==2.13.0
export OMP_NUM_THREADS ?= 1

.PHONY: install demo test lint

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet "$(TORCH)"
	$(VENV)/bin/pip install --quiet -e ".[trl,peft,dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/hf-r8 demo

lint: install
	$(VENV)/bin/ruff check .

test: lint
	$(VENV)/bin/python -m pytest -q
