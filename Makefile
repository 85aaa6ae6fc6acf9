# The two commands of the README's quickstart: `make test` and `make bench`.
# Both create .venv when needed (with the system's site-packages visible, so that a machine
# with torch/triton preinstalled downloads nothing), install only what is missing, and install
# this package in editable mode.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: test bench install deps clean

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

deps: $(PY)
	$(PY) tools/ensure_deps.py

install: deps
	$(PY) -m pip install --no-build-isolation --no-deps -e .

# The files run in pytest-xdist workers where it is installed and there are two cores or more
# (tools/pytest_workers.py says why and how to turn it off: EKD_TEST_WORKERS=1).
test: install
	workers=$$($(PY) tools/pytest_workers.py) && $(PY) -m pytest python_tests $$workers $(PYTEST_ARGS)

# The loss benchmark, the Table-5 training step, then the plots (PNG when matplotlib is present).
bench: install
	$(PY) bench/bench_loss.py
	$(PY) bench/bench_train_step.py
	$(PY) bench/plot.py

clean:
	rm -rf build *.egg-info ekd_kernels/*.so
