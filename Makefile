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

# The tests that time nothing, two at a time (one module per process), then the timing tests alone (the
# `timing` mark: tests/conftest.py); both parts run, and the first failure's status is the result.
TEST_WORKERS ?= 2
test: $(BIN)/.installed
	@status=0; \
	$(BIN)/python -m pytest -q -m "not timing" -n $(TEST_WORKERS) --dist loadfile --durations=15 || status=$$?; \
	$(BIN)/python -m pytest -q -m timing --durations=15 || { s=$$?; [ $$status -ne 0 ] || status=$$s; }; \
	exit $$status

bench: $(BIN)/.installed
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python bench/generator_capacity.py

lint: $(BIN)/.installed
	$(BIN)/python -m pip install -q ruff
	$(BIN)/ruff check loadgen servers tests bench

clean:
	rm -rf $(VENV) runs
