# Both main targets build the environment on a fresh machine first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch; override (e.g. TORCH_SPEC="torch>=2.3") on a GPU machine.
TORCH_SPEC ?= torch==2.13.0

.PHONY: all env test bench lint stress clean

all: test

$(VENV)/.ready: pyproject.toml setup.py $(wildcard native/*.cpp native/*.h)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,hf,lightning]"
	touch $@

env: $(VENV)/.ready

# The benchmark's plot needs matplotlib (the optional extra "bench").
$(VENV)/.bench-ready: $(VENV)/.ready
	$(PY) -m pip install -q -e ".[bench]"
	touch $@

test: env
	$(PY) -m ruff check fastckpt tests benchmarks
	$(PY) -m pytest -q

stress: env
	$(PY) -m pytest -q -m slow --run-slow

bench: $(VENV)/.bench-ready
	$(PY) -m benchmarks.run

lint: env
	$(PY) -m ruff check fastckpt tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
