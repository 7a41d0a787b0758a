# Two commands for a newcomer: `make demo` (set up, then train digits-cnn at 2 ranks) and `make test`.
# Both run scripts/setup.sh first, which is idempotent and takes seconds once everything is installed.
# The default stack: TensorFlow 2.21 with tf-keras and a patched Horovod (.venv). HVDTRAIN_STACK=tf2.15: TensorFlow
# 2.15.1 with its own Keras and Horovod unchanged, in .venv-tf2.15 (README: Two stacks).
HVDTRAIN_STACK ?= current
export HVDTRAIN_STACK
VENV ?= $(if $(filter tf2.15,$(HVDTRAIN_STACK)),$(CURDIR)/.venv-tf2.15,$(CURDIR)/.venv)
BIN := $(VENV)/bin
NP ?= 2
PYTEST_ARGS ?=
# Two pytest workers, each taking whole test files (module fixtures are not repeated): the tests' processes leave
# about half of 2 cores idle (Horovod's negotiation, servers starting, polling), which the second worker uses.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile
TESTS ?= tests
# What CI runs on the tf2.15 stack besides the whole suite on the default one: data-parallel, tensor and pipeline
# equivalence at 2 and 4 ranks, elastic training that loses a worker, compression (TFLite int8, QAT, pruning,
# distillation), the unit tests. The whole suite on it: `make test HVDTRAIN_STACK=tf2.15` (README: Two stacks).
TF215_TESTS := tests/unit tests/parallel/test_layouts.py tests/e2e/test_compression.py \
	tests/e2e/test_fault_tolerance.py::test_elastic_job_survives_a_killed_worker

.PHONY: setup setup-test demo test test-tf2.15 test-unit test-parallel test-e2e lint clean

setup:
	VENV=$(VENV) bash scripts/setup.sh

# The tests also need the optional extras (object storage, Ray) and the Debian packages of the real servers they
# start (Ceph's S3 gateway, Slurm).
setup-test:
	VENV=$(VENV) HVDTRAIN_EXTRAS=ray HVDTRAIN_TEST_SERVERS=1 bash scripts/setup.sh

demo: setup
	NP=$(NP) VENV=$(VENV) bash scripts/train.sh --recipe digits-cnn --output runs/demo

test: setup-test
	$(PYTEST) $(TESTS) $(PYTEST_ARGS)

# CI's check of the tf2.15 stack (its own venv, set up first)
test-tf2.15:
	$(MAKE) test HVDTRAIN_STACK=tf2.15 VENV=$(CURDIR)/.venv-tf2.15 TESTS="$(TF215_TESTS)"

test-unit: setup-test
	$(PYTEST) tests/unit $(PYTEST_ARGS)

test-parallel: setup-test
	$(PYTEST) tests/parallel $(PYTEST_ARGS)

test-e2e: setup-test
	$(PYTEST) tests/e2e $(PYTEST_ARGS)

# ruff (pyflakes and pycodestyle rules, lines of 120 as the code uses; pyproject.toml); CI runs it
lint: setup-test
	$(BIN)/ruff check hvdtrain models tests scripts

clean:
	rm -rf runs .pytest_cache
