# Two entry points, each creating .venv on first use: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Where an NVIDIA driver answers, the CUDA 13 libraries onnxruntime-gpu links against
# (about 1.3 GB from PyPI); elsewhere they could not run, and are left out.
EXTRAS ?= dev$(shell nvidia-smi -L >/dev/null 2>&1 && echo ,gpu)
RUN ?= runs/demo
REPO ?= $(RUN)/model_repository
PORT ?= 8001
METRICS_PORT ?= 8002
PROBE_PORT ?= 8003
HTTP_PORT ?= 8000

.PHONY: demo train export serve bench test lint stubs install clean perf-analyzer prometheus peers gpu-image gpu-check

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

# train -> export -> serve -> classify a few held-out digits -> a short load test.
demo: train export
	@$(BIN)/python -m service --repo $(REPO) --port $(PORT) --metrics-port $(METRICS_PORT) --probe-port $(PROBE_PORT) --http-port $(HTTP_PORT) \
	    > $(RUN)/server.log 2>&1 & pid=$$!; \
	  trap 'kill $$pid 2>/dev/null' EXIT; \
	  $(BIN)/python -m service.client --address 127.0.0.1:$(PORT) --wait 120 --digits 8 \
	    || { cat $(RUN)/server.log; exit 1; }; \
	  kill -TERM $$pid && wait $$pid && echo "server stopped cleanly; its log: $(RUN)/server.log"
	$(BIN)/python -m loadtests.bench --repo $(REPO) --quick --seconds 5 --out $(RUN)/reports

# The full benchmark (about 10 minutes): every scenario, report under reports/<timestamp>/.
bench: $(STAMP)
	$(BIN)/python -m loadtests.bench --repo $(REPO) --out reports

# Triton (nvidia-pytriton) and MLServer in venvs of their own, against the service.
peers: $(STAMP)
	$(BIN)/python -m loadtests.peers --repo $(REPO) --out reports

train: $(STAMP)
	$(BIN)/python -m training --preset quick --model lenet alexnet vgg11_bn --out $(RUN)

export: $(STAMP)
	rm -rf $(REPO)
	$(BIN)/python -m export --all $(RUN) --repo $(REPO) --fp16

serve: $(STAMP)
	$(BIN)/python -m service --repo $(REPO) --port $(PORT) --metrics-port $(METRICS_PORT) --probe-port $(PROBE_PORT) --http-port $(HTTP_PORT)

test: $(STAMP) prometheus
	$(BIN)/python -m pytest

# Debian's prometheus and promtool, for the tests that scrape with them; where apt cannot
# install them without a prompt (no root, no Debian), those tests skip and say so.
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && { \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus \
	      >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus \
	      >/dev/null 2>&1; }; } || echo "prometheus not installed: its tests will skip"; }

# The GPU server image built and started here (no GPU needed): about 3.5 GB, 10 minutes.
gpu-image: $(STAMP)
	$(BIN)/python -m pytest -m gpu_image tests/deploy/test_gpu_image.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy contract training export service loadtests tests

# Triton's perf_analyzer in a venv of its own (the project's tritonclient pin is untouched);
# run it as loadtests/perf_analyzer.sh. Needs Debian's libb64-0d (apt-get install libb64-0d).
perf-analyzer:
	test -x .venv-perf-analyzer/bin/python || $(PYTHON) -m venv .venv-perf-analyzer
	.venv-perf-analyzer/bin/python -m pip install --quiet --disable-pip-version-check \
	    -r loadtests/perf_analyzer.txt
	@ldconfig -p | grep -q libb64.so.0d || echo "perf_analyzer also needs libb64: apt-get install libb64-0d"

stubs: $(STAMP)
	$(BIN)/python -m protos.generate

clean:
	rm -rf $(VENV) runs
