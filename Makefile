PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= $(if $(COMPRESS_DATA),$(COMPRESS_DATA),../shared/data/cifar10)

.PHONY: env demo test bench clean

$(BIN)/chansearch: setup.py requirements-ci.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -r requirements-ci.txt
	touch $@

env: $(BIN)/chansearch

demo: env
	$(BIN)/chansearch profile mobilenet_v2
	$(BIN)/chansearch prune mobilenet_v2 --macs 50% --strategy global -o runs/demo/mobilenet_v2_50.pt
	$(BIN)/chansearch profile runs/demo/mobilenet_v2_50.pt
	$(BIN)/chansearch export runs/demo/mobilenet_v2_50.pt --format onnx -o runs/demo/mobilenet_v2_50.onnx
	$(BIN)/chansearch export runs/demo/mobilenet_v2_50.pt --format tflite -o runs/demo/mobilenet_v2_50.tflite
	$(BIN)/chansearch latency runs/demo/mobilenet_v2_50.onnx --threads 1 --runs 50
	$(BIN)/chansearch latency runs/demo/mobilenet_v2_50.tflite --threads 1 --runs 50

test: env
	$(BIN)/python -m pytest -q tests

bench: env
	$(BIN)/python benchmarks/run_all.py --quick

clean:
	rm -rf $(VENV) runs
