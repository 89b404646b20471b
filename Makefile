# The README's two commands: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PKGS := -e '.[dev]' -e ./contracts -e ./agents

.PHONY: install demo test test-newest lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet $(PKGS)

demo: install
	$(BIN)/busagents demo $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest $(ARGS)

# The suite against the newest nats-py and anthropic, past the bounds in pyproject.toml, in a
# second venv (pip warns that they conflict with those bounds: that is the point). For CI, on a
# schedule: tests/test_adapters.py names what a new release broke in busagents/_natspy.py.
NEWEST ?= $(VENV)/newest
test-newest:
	test -x $(NEWEST)/bin/python || $(PYTHON) -m venv $(NEWEST)
	$(NEWEST)/bin/python -m pip install --quiet --upgrade pip
	$(NEWEST)/bin/python -m pip install --quiet $(PKGS)
	$(NEWEST)/bin/python -m pip install --quiet --upgrade nats-py anthropic
	$(NEWEST)/bin/python -m pip list 2>/dev/null | grep -E '^(nats-py|anthropic) '
	$(NEWEST)/bin/python -m pytest $(ARGS)

bench: install
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m benchmarks $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
