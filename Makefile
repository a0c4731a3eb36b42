# Two set-up commands: `make demo` and `make test`. Both create .venv/ when missing.
PYTHON ?= python3
VENV ?= .venv
# Pick another torch build here, e.g. TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.t2v-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install demo test lint bench bench-encoders browser postgres clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(STAMP)

# The browser test drives Debian's Chromium; install it when it is missing.
browser:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; }

# The shared-store tests start their own PostgreSQL cluster from Debian's server binaries.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q postgresql; }

demo: install
	$(VENV)/bin/t2v generate "a large red circle moving right" -o out/demo.mp4

test: install browser postgres
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check src tests bench tools experiments
	$(VENV)/bin/ruff format --check src tests bench tools experiments

# Each bench prints a table. The text-encoder comparison trains four generators (about 41
# minutes on 2 cores), so it has its own target.
QUICK_BENCHES := data generate serve train filter
bench: install
	for f in $(QUICK_BENCHES); do $(PY) bench/$$f.py || exit 1; done

bench-encoders: install
	$(PY) bench/text_encoders.py

clean:
	rm -rf $(VENV) out build *.egg-info src/*.egg-info
