# Set-up and everyday commands.  Everything installs into ./.venv.
# torch: when the venv has none, `pip install $(TORCH_SPEC)` (torch==2.13.0: a CPU build that lies
# on the project's machines; elsewhere pip fetches that release). Override for CUDA, e.g.
#   make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-slow test-all lint format bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

demo: install
	$(PY) examples/svi_2d.py --quick
	$(PY) -m pyro_diffusion.experiments.likelihood --demo --data digits --out runs/demo

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

test-all: install
	$(PY) -m pytest -q -m "slow or not slow"

lint: install
	$(VENV)/bin/ruff check pyro_diffusion tests examples benchmarks
	$(VENV)/bin/ruff format --check pyro_diffusion tests examples benchmarks

format: install
	$(VENV)/bin/ruff format pyro_diffusion tests examples benchmarks
	$(VENV)/bin/ruff check --fix pyro_diffusion tests examples benchmarks

bench: install
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info runs
