# One command each: `make run` serves, `make test` checks. Both install what they need.
VENV   := .venv
PY     := $(VENV)/bin/python
SUM    := $(shell cat pyproject.toml | cksum | cut -d' ' -f1)
DAEMON := $(VENV)/.installed-daemon-$(SUM)
DEV    := $(VENV)/.installed-dev-$(SUM)
ML     := $(VENV)/.installed-ml-$(SUM)

.PHONY: install install-ml run test test-fast test-bench test-ml lint proto bench bench-smoke container-test clean

$(VENV)/bin/python:
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# The daemon and the client (`pip install 'drived[daemon]'`).
$(DAEMON): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e '.[daemon]'
	touch $@

# Everything the tests, linters and benchmarks use.
$(DEV): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(DAEMON) $@

install: $(DEV)

# torch, Lightning and pyarrow for the `ml` tests and the DataLoader benchmark. torch first, pinned:
# pip takes the CPU wheel this machine holds; left to resolve torch itself, it downloads a CUDA build.
$(ML): $(DEV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,ml]'
	touch $@

install-ml: $(ML)

run: $(DAEMON)
	$(VENV)/bin/drived

proto: $(DEV)
	$(PY) tools/gen_proto.py

lint: $(DEV)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	tools/buf.sh

# Everything but the benchmark harness (markers in pyproject.toml: unit, integration, slow, bench, ml).
# The ml tests run when torch, Lightning and pyarrow are installed (`make install-ml`); otherwise the
# summary says they were skipped and why.
# Two processes, a file's tests in one of them: most of a test is waiting on a daemon or another server.
# Each process starts its servers on ports of its own (bench.services.free_port). The slowest 25 tests are listed
# at the end: CI's whole run is kept under 15 minutes.
test: lint
	$(VENV)/bin/pytest -q -n 2 --dist loadfile --durations=25

# The edit loop: unit tests only (no daemon, no other server), in seconds.
test-fast: $(DEV)
	$(VENV)/bin/pytest -q -m unit

# The benchmark harness end to end with tiny sizes: every figure reported, none asserted (.ci/run runs it).
test-bench: $(DEV)
	$(VENV)/bin/pytest -q -m bench

test-ml: $(ML)
	$(VENV)/bin/pytest -q -m ml

# The DataLoader figures need torch: both install the ml extra.
bench: $(ML)
	$(PY) -m bench

bench-smoke: $(ML)
	$(PY) -m bench --smoke --out $(or $(BENCH_OUT),/tmp/drived-bench-smoke)

# Builds the image with podman and checks it from the host (exit 77: podman unavailable, reason printed).
container-test: $(DEV)
	bash tests/container_test.sh

clean:
	rm -rf $(VENV) .tools drive-data .pytest_cache .mypy_cache .ruff_cache
