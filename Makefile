PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# pip itself is pinned too: the lock is installed the same way on every machine
PIP_VERSION := 26.3
PIP_TOOLS_VERSION := 7.6.2

.PHONY: env demo test test-fast bench lock clean

# Every package comes from the lock file (requirements-ci.txt, all versions pinned); the
# project itself is installed without dependencies so nothing outside the lock is resolved.
$(BIN)/chansearch: setup.py requirements-ci.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install pip==$(PIP_VERSION)
	$(BIN)/python -m pip install -r requirements-ci.txt
	$(BIN)/python -m pip install --no-deps -e .
	touch $@

env: $(BIN)/chansearch

demo: env
	overrides=$$($(BIN)/python -m compress.app.demo) && $(BIN)/chansearch run recipes/quickstart.yaml $$overrides

# Two pytest workers, one thread each: most tests are short and single-threaded work (imports,
# exports, subprocesses) overlaps; the whole suite is under 10 minutes on 2 cores.
TEST := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15

test: env
	$(TEST) tests

# The unit tests alone (no pipeline, training run, export or subprocess): under 2 minutes.
test-fast: env
	$(TEST) -m "not slow" tests

bench: env
	$(BIN)/python benchmarks/run_all.py --quick

# Regenerate the lock from setup.py's ranges (with the dev extra) and requirements-ci.in's
# pins, newest versions allowed by both; in a venv of its own so the tool stays out of .venv.
lock:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install pip==$(PIP_VERSION) pip-tools==$(PIP_TOOLS_VERSION)
	.venv-lock/bin/pip-compile --upgrade --extra dev --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links \
		--output-file requirements-ci.txt setup.py requirements-ci.in

clean:
	rm -rf $(VENV) .venv-lock runs
