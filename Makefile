# The README's two commands: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: demo test bench lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/loadgen demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q --durations=25

bench: $(BIN)/.installed
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python bench/generator_capacity.py

lint: $(BIN)/.installed
	$(BIN)/python -m pip install -q ruff
	$(BIN)/ruff check loadgen servers tests bench

clean:
	rm -rf $(VENV) runs
