# Quickstart: `make demo` runs the demo, `make test` runs the tests.
# Both create the virtual environment .venv with pinned versions first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FAULT ?= lr
STAMP := $(VENV)/.installed

.PHONY: demo test proto serve clean

$(STAMP): pyproject.toml requirements-lock.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements-lock.txt -r requirements-lock.txt
	$(BIN)/python -m pip install --quiet -c requirements-lock.txt -e '.[service,client,demo,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/nanwatch demo --fault $(FAULT)

test: $(STAMP)
	$(BIN)/python -m pytest -q

proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py

serve: $(STAMP)
	$(BIN)/nanwatch serve

clean:
	rm -rf $(VENV)
