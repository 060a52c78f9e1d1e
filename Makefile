# One command each: `make run` serves, `make test` checks. Both install what they need.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install run test lint proto bench bench-smoke container-test clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/drived

proto: $(STAMP)
	$(PY) tools/gen_proto.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	tools/buf.sh

test: lint
	$(VENV)/bin/pytest -q

bench: $(STAMP)
	$(PY) -m bench

bench-smoke: $(STAMP)
	$(PY) -m bench --smoke --out $(or $(BENCH_OUT),/tmp/drived-bench-smoke)

# Builds the image with podman and checks it from the host (exit 77: podman unavailable, reason printed).
container-test: $(STAMP)
	bash tests/container_test.sh

clean:
	rm -rf $(VENV) .tools drive-data .pytest_cache .mypy_cache .ruff_cache
