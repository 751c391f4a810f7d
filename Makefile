PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# pip itself is pinned too: the lock is installed the same way on every machine
PIP_VERSION := 26.3

.PHONY: env demo test test-fast bench lock lock-check clean

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
# exports, subprocesses) overlaps. The whole suite took 7.8 minutes on our 2-core VM at its last run
# and 9.5 at the one before (the target is 10; this VM's speed varies): its time is mostly
# torch.export, under each TFLite conversion and ONNX export.
TEST := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15

test: env
	$(TEST) tests

# The unit tests alone (no pipeline, training run, export or subprocess): under 2 minutes.
test-fast: env
	$(TEST) -m "not slow" tests

bench: env
	$(BIN)/python benchmarks/run_all.py --quick

# Regenerate the lock from setup.py's ranges (with the dev extra) and requirements-ci.in's pins,
# newest versions allowed by both, as one universal lock: environment markers say which
# packages each platform takes (the CUDA wheels Linux only); in a venv of its own so the tool
# stays out of .venv. lock-check resolves it for each platform the README names.
UV_VERSION := 0.13.9
LOCK_PLATFORMS := x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu aarch64-apple-darwin

.venv-lock/bin/uv:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install pip==$(PIP_VERSION) uv==$(UV_VERSION)

lock: .venv-lock/bin/uv
	.venv-lock/bin/uv pip compile --universal --python-version 3.11 --upgrade --extra dev --no-emit-index-url \
		--output-file requirements-ci.txt setup.py requirements-ci.in

lock-check: .venv-lock/bin/uv
	for platform in $(LOCK_PLATFORMS); do \
		MACOSX_DEPLOYMENT_TARGET=14.0 .venv-lock/bin/uv pip compile --quiet --python-platform $$platform \
			--python-version 3.11 --only-binary :all: --no-deps --output-file /dev/null requirements-ci.txt \
			&& echo "$$platform: resolves" || exit 1; \
	done

clean:
	rm -rf $(VENV) .venv-lock runs
