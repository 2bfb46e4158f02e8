# vggt4d: every target sets up .venv itself on a fresh clone (CPU torch first, DA3 without its
# heavy declared requirements, then this package with its dev tools).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# -qq: errors only (the machine's pip configuration warns about missing local indexes);
# --no-warn-conflicts: DA3's declared requirements are left out on purpose (see above).
PIP := $(PY) -m pip install -qq --disable-pip-version-check --no-warn-conflicts
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slurm bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) --no-deps depth-anything-3==0.1.1 evo==1.38.1
	$(PIP) -e '.[dev,launchers]'
	touch $(STAMP)

demo: setup
	$(PY) -m vggt4d.run experiment=demo

test: setup
	$(PY) -m pytest -q

# Installs slurm-wlm + munge (root, apt-get), starts a one-node cluster on the loopback address,
# runs tests/test_slurm.py on it and stops the daemons by their PIDs.
test-slurm: setup
	scripts/slurm/test.sh $(PY)

bench: setup
	$(PY) -m bench.run

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) outputs/runs outputs/multirun outputs/cache
