PYTHON ?= .venv/bin/python
PIP_TORCH ?= torch==2.13.0

.PHONY: install test lint run bench-train format

.venv/bin/python:
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip

## install: create .venv with the CPU build of torch and the project (editable) plus dev tools
install: .venv/bin/python
	.venv/bin/pip install -q "$(PIP_TORCH)" || .venv/bin/pip install -q torch --index-url https://download.pytorch.org/whl/cpu
	.venv/bin/pip install -q -e ".[dev]"

## test: lint, then the whole test suite (what CI runs)
test: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

## run: train on the built-in synthetic data if ./artifacts is missing, then serve on http://127.0.0.1:8000
run: install
	$(PYTHON) -m service run --artifacts artifacts --train-config configs/synthetic.yaml --host 127.0.0.1 --port 8000
