# nngf_fem -- the two commands for a newcomer are `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
MPIRUN := $(VENV)/bin/mpiexec
NP     ?= 2
PYTEST_ARGS ?=

.PHONY: setup demo test test-serial test-mpi lint bench docs clean

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

# all benchmarks at the sizes of BENCHMARKS.md (about 3.5 minutes on 2 cores); JSON and
# PNGs land in benchmarks/results/
# one thread per rank: steady timings on a shared 2-core machine
bench: export OMP_NUM_THREADS = 1
bench: setup
	$(PY) benchmarks/b1_regression.py
	$(PY) benchmarks/b2_ritz.py
	$(PY) benchmarks/b3_darcy.py
	$(PY) benchmarks/b3_darcy.py --mesh-study
	$(PY) benchmarks/b4_cost_split.py
	$(PY) benchmarks/b5_mpi.py
	$(PY) benchmarks/b6_network_size.py --repeats 3
	$(PY) benchmarks/b7_robust.py
	$(PY) benchmarks/b8_elasticity.py

# the documentation site (Sphinx, warnings are errors): open docs/_build/html/index.html
docs: setup
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

lint: setup
	$(VENV)/bin/ruff check nngf_fem tests demos examples benchmarks

clean:
	rm -rf out_* .pytest_cache
