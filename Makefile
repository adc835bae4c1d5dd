PYTHON ?= .venv/bin/python
PIP_TORCH ?= torch==2.13.0

.PHONY: install install-locked lock audit test lint run bench-train bench-serve bench-gpu format compose-check

.venv/bin/python:
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip

## install: create .venv with the CPU build of torch and the project (editable) plus dev tools
install: .venv/bin/python
	.venv/bin/pip install -q "$(PIP_TORCH)" || .venv/bin/pip install -q torch --index-url https://download.pytorch.org/whl/cpu
	.venv/bin/pip install -q -e ".[dev]"
	touch .venv/.installed

# What test, run and the benches need: installed once, again only when pyproject.toml changes (`make install`
# forces it).
.venv/.installed: pyproject.toml | .venv/bin/python
	$(MAKE) install

## install-locked: like install, but every package at the version pinned in requirements-dev.lock
install-locked: .venv/bin/python
	.venv/bin/pip install -q "$(PIP_TORCH)" || .venv/bin/pip install -q "$(PIP_TORCH)" --index-url https://download.pytorch.org/whl/cpu
	.venv/bin/pip install -q -r requirements-dev.lock
	.venv/bin/pip install -q --no-deps -e .

## lock: rewrite requirements.lock (runtime) and requirements-dev.lock (runtime + dev) from the installed .venv
lock:
	$(PYTHON) tools/lock_deps.py

# torch advisories with no fixed release, reviewed and accepted in docs/reliability.md ("Dependency audit");
# `make audit AUDIT_IGNORE=` shows them again
AUDIT_IGNORE ?= PYSEC-2026-139 PYSEC-2025-189 PYSEC-2025-190 PYSEC-2025-191 PYSEC-2025-192 PYSEC-2025-193 \
	PYSEC-2025-194 PYSEC-2025-195 PYSEC-2025-196 PYSEC-2025-197 PYSEC-2025-210

## audit: pip-audit the pinned runtime dependencies (needs pypi.org or osv.dev; pip-audit installed on demand)
audit:
	$(PYTHON) -m pip_audit --version >/dev/null 2>&1 || $(PYTHON) -m pip install -q pip-audit
	$(PYTHON) -m pip_audit -r requirements.lock --strict --no-deps --disable-pip $(AUDIT_IGNORE:%=--ignore-vuln=%)

## test: lint, then the whole test suite (what CI runs)
test: .venv/.installed
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

## run: train on the built-in synthetic data if ./artifacts is missing, then serve on http://127.0.0.1:8000
run: .venv/.installed
	$(PYTHON) -m service run --artifacts artifacts --train-config configs/synthetic.yaml --host 127.0.0.1 --port 8000

## bench-train: training speed table (bench/train.py --help for options)
bench-train: .venv/.installed
	$(PYTHON) bench/train.py --quality

## bench-gpu: on a machine with CUDA and a CUDA build of torch (PYTHON=...): the GPU tests, then the training
## benches of docs/performance.md, "GPU (NVIDIA H200)" (TikTok in ../shared/data/tiktok, or TIKTOK=DIR)
TIKTOK ?= ../shared/data/tiktok
bench-gpu:
	$(PYTHON) -m pytest -q --noconftest tests/test_cuda.py
	$(PYTHON) bench/train.py --device cuda --datasets tiktok --tiktok $(TIKTOK) --steps 30 --warmup 5
	$(PYTHON) bench/train.py --device cuda --datasets tiktok --tiktok $(TIKTOK) --models metammf_gcn --tensors cp \
		--precisions fp32 tf32 bf16 --no-reference --quality --quality-seconds 60
	$(PYTHON) bench/train.py --device cuda --datasets paper-tiktok paper-movielens --no-reference --precisions fp32 tf32 bf16

## bench-serve: serving latency/throughput table with wrk (bench/serve.py --help for options)
bench-serve: .venv/.installed
	$(PYTHON) bench/serve.py

## compose-check: the compose stack for real (build, up, API through the entry point, 3 replicas, restart, stop)
compose-check:
	bash docker/compose_check.sh
