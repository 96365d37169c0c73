# Each target sets itself up in a virtual environment, .venv, with the CPU build of torch installed
# first (so no CUDA build is pulled). `make demo` then installs seqblocks with the `plot` extra only:
# a CPU never runs Triton. `make test`, `make lint` and `make install` add the `dev` and `triton` extras
# (the test suite runs the Triton kernels on the CPU under TRITON_INTERPRET=1).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_STAMP := $(VENV)/.torch
DEMO_STAMP := $(VENV)/.installed-demo
DEV_STAMP := $(VENV)/.installed

.PHONY: install demo test lint clean

$(TORCH_STAMP):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	touch $@

# The development install includes everything the demo needs, so it marks the demo as installed too.
$(DEV_STAMP): pyproject.toml $(TORCH_STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,triton,plot]'
	touch $@ $(DEMO_STAMP)

$(DEMO_STAMP): pyproject.toml $(TORCH_STAMP)
	$(BIN)/python -m pip install --quiet -e '.[plot]'
	touch $@

install: $(DEV_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/seqblocks train --overwrite
	$(BIN)/seqblocks generate runs/tiny --prompt "def "

test: $(DEV_STAMP)
	$(BIN)/python -m pytest -q

lint: $(DEV_STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
