PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: env demo test bench clean

$(BIN)/chansearch: setup.py requirements-ci.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -r requirements-ci.txt
	touch $@

env: $(BIN)/chansearch

demo: env
	overrides=$$($(BIN)/python -m compress.demo) && $(BIN)/chansearch run recipes/quickstart.yaml $$overrides

test: env
	$(BIN)/python -m pytest -q tests

bench: env
	$(BIN)/python benchmarks/run_all.py --quick

clean:
	rm -rf $(VENV) runs
