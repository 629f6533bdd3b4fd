# nngf_fem -- the two commands for a newcomer are `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
MPIRUN := $(VENV)/bin/mpiexec
NP     ?= 2
PYTEST_ARGS ?=

.PHONY: setup demo test test-serial test-mpi lint bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(MPIRUN) -n $(NP) $(PY) demos/demo_darcy_inversion.py --expand

test: setup
	$(VENV)/bin/ruff check nngf_fem tests demos examples benchmarks
	timeout 1500 $(PY) -m pytest -q $(PYTEST_ARGS)
	timeout 1500 $(MPIRUN) -n $(NP) $(PY) -m pytest -q -x $(PYTEST_ARGS)

test-serial: setup
	timeout 1500 $(PY) -m pytest -q $(PYTEST_ARGS)

test-mpi: setup
	timeout 1500 $(MPIRUN) -n $(NP) $(PY) -m pytest -q -x $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check nngf_fem tests demos examples benchmarks

clean:
	rm -rf out_* .pytest_cache
