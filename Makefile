# The README's two commands: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PKGS := -e '.[dev]' -e ./contracts -e ./agents
# The official AsyncAPI parser (npm), for tests/test_asyncapi.py; that test skips, saying so, without node
ASYNCAPI := tests/asyncapi
PARSER := $(ASYNCAPI)/node_modules/.package-lock.json
# Debian's chromium, for the chat page's browser test (tests/test_flight_chat_browser.py, Playwright drives it;
# nothing is downloaded at run time). Installed with apt when missing; that test fails without it
CHROMIUM := /usr/bin/chromium

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

test: lint $(PARSER) $(CHROMIUM)
	$(BIN)/python -m pytest $(ARGS)

$(CHROMIUM):
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's chromium (apt-get) for tests/test_flight_chat_browser.py"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	else echo "no $(CHROMIUM): install Debian's chromium (apt-get install chromium) for tests/test_flight_chat_browser.py"; fi

$(PARSER): $(ASYNCAPI)/package.json $(ASYNCAPI)/package-lock.json
	@if command -v npm >/dev/null; then \
		cd $(ASYNCAPI) && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error; \
	else echo "npm not found: tests/test_asyncapi.py will skip the official AsyncAPI parser"; fi

# The suite against the newest nats-py and anthropic, past the bounds in pyproject.toml, in a
# second venv (pip warns that they conflict with those bounds: that is the point). For CI, on a
# schedule: tests/test_adapters.py names what a new release broke in busagents/_natspy.py.
NEWEST ?= $(VENV)/newest
test-newest: $(PARSER) $(CHROMIUM)
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
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache $(ASYNCAPI)/node_modules
