# EmbedDeck. `make run` sets up and starts the product; `make test` sets up and runs the tests.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export SPARK_LOCAL_IP := 127.0.0.1
export PYTHONPATH := $(CURDIR)

.PHONY: run test test-unit setup system-deps bench gpu-check lint clean images e2e jupyter

run: setup
	$(BIN)/python -m dashboard

# Two pytest workers, a test file each at a time: the suite waits on JVMs, servers and browsers about half the time,
# and kept one core of two idle (serial: 13-14 min on 2 cores, Zen 5 EPYC; 8-10 min in two).
test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist loadfile

# The fast tier alone: pure logic, the encoder, the API in-process, SQLite; no Spark, JVM or server (299 tests, 1 min 47 s on 2 cores, Zen 5 EPYC).
test-unit: setup
	$(BIN)/python -m pytest -m "not spark and not browser and not server"

bench: setup
	$(BIN)/python -m jobs.doors.bench $(if $(QUICK),--quick,)

# On a machine with an NVIDIA GPU: CUDA fp16 texts/s (short and long texts) and cosine to fp32.
gpu-check: setup
	$(BIN)/python -m jobs.doors.gpu_check

# The two images, built with buildah (no Docker engine, no registry needed): docker/images.sh.
images:
	bash docker/images.sh

# The deployment's topology from those images: controller + KEDA-driven workers + PostgreSQL (tests/e2e_images.py).
e2e: setup images
	$(BIN)/python -m tests.e2e_images

# JupyterLab on 127.0.0.1 beside `make run`: its kernels reach the same database, registry and cluster (jobs/doors/jupyter.py).
jupyter: setup
	$(BIN)/python -m jobs.doors.jupyter

lint: setup
	$(BIN)/ruff check .

# The JVM class archive (jobs/jvm.py) belongs to this JDK and pyspark: built once, rebuilt when either changes.
setup: system-deps $(STAMP)
	@$(BIN)/python -m jobs.spark.jvm

# Java for Spark, unixODBC for pyodbc, PostgreSQL for the tests, Chromium for browser tests.
system-deps:
	@missing=""; \
	java -version 2>&1 | grep -qE 'version "(1[7-9]|2[0-9])' || missing="$$missing openjdk-17-jre-headless"; \
	ldconfig -p | grep -q 'libodbc.so.2' || missing="$$missing unixodbc"; \
	ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
		echo "installing system packages:$$missing"; \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache
