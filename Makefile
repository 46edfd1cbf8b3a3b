# daybook: two commands on a fresh machine.
#   make run    runs the demo on the embedded default (SQLite under ./.daybook/)
#   make test   installs everything into .venv and runs the whole suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test unit lint generate bench clean browser

# Python keeps what it compiles (__pycache__), whatever the shell says: the suite starts
# hundreds of processes (servers, workers, processes killed on purpose), and with
# PYTHONDONTWRITEBYTECODE set each of them compiled daybook's sources again.
unexport PYTHONDONTWRITEBYTECODE

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/daybook demo

# Six processes, each with its own PostgreSQL and broker: one test's waits (on servers,
# processes and timeouts) are another's CPU. On the shared 2-core machine, the suite alone
# (install and browser check apart): 8 min 17 s with four processes, the two cores 74%
# busy; 7 min 31 s with six, 87% busy (so more would not help much). Each process starts
# with its part of the slow tests (tests/scheduling.py): 8 min 24 s in file order, 7 min 53 s
# so, in one session on this machine.
test: $(STAMP) browser
	$(PY) -m pytest -n 6 --dist worksteal

# The dashboard's tests drive a real browser: Debian's Chromium, never a downloaded one.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	    echo "make: installing Debian's chromium (apt-get) for the dashboard's browser test"; \
	    apt-get install -y -q chromium >/dev/null 2>&1 \
	    || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; } \
	    || { echo "make: could not install chromium: install it (it must be on the PATH)"; exit 1; }; }

unit: $(STAMP)
	$(PY) -m pytest tests/unit

# Type and import checkers resolve modules from folders, and the folders here are not named
# as they import (domain/ is daybook.domain): build/lint/daybook is a tree of links that is.
LINT_VIEW := build/lint

lint: $(STAMP)
	$(VENV)/bin/ruff check domain projections infrastructure tests scripts
	rm -rf $(LINT_VIEW) && mkdir -p $(LINT_VIEW)/daybook
	ln -s ../../../domain ../../../projections ../../../infrastructure $(LINT_VIEW)/daybook/
	ln -s ../../../infrastructure/face/__init__.py $(LINT_VIEW)/daybook/__init__.py
	MYPYPATH=$(LINT_VIEW) $(VENV)/bin/mypy -p daybook
	MYPYPATH=$(LINT_VIEW) $(VENV)/bin/mypy scripts
	PYTHONPATH=$(LINT_VIEW) $(VENV)/bin/lint-imports --no-cache

# The ledger's typed methods, one per registered command (infrastructure/ledger/methods.py).
generate: $(STAMP)
	$(PY) scripts/generate_ledger_methods.py

bench: $(STAMP)
	$(PY) scripts/bench_codec.py
	$(PY) scripts/bench_write.py
	$(PY) scripts/bench_write_cpu.py
	$(PY) scripts/bench_only_read.py
	$(PY) scripts/bench_append.py
	$(PY) scripts/bench_history.py
	$(PY) scripts/soak_write.py
	$(PY) scripts/bench_projections.py
	$(PY) scripts/bench_streaming.py
	$(PY) scripts/bench_http.py
	$(PY) scripts/bench_sagas.py
	$(PY) scripts/bench_instrumentation.py

clean:
	rm -rf $(VENV) .daybook bench-results
