# Two commands matter: `make run` (the demo on embedded defaults) and `make test` (the suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
SIM_PORT ?= 9100

.PHONY: install run test test-fast lint bench bench-transports clean

# Bytecode is written even where the shell says not to: without it pytest rewrites the assertions of
# every pytest plugin's package again in every process (about 10 s per xdist worker and per server
# an e2e test starts).
unexport PYTHONDONTWRITEBYTECODE

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

# Embedded defaults: SQLite in var/, in-process state, a simulated upstream on $(SIM_PORT).
run: install
	$(PY) manage.py migrate --noinput
	$(PY) manage.py seed_encodings
	$(PY) manage.py seed_demo --upstream http://127.0.0.1:$(SIM_PORT) --upstream-key sim-key --key-file var/demo-key
	$(PY) -m gateway.demo --host $(HOST) --port $(PORT) --sim-port $(SIM_PORT)

# The whole suite on whatever DATABASE_URL / REDIS_URL say (embedded defaults when unset), with the
# management API's schemathesis run at its full depth (GATEWAY_TEST_FUZZ=deep).
# In-process tests on two workers (pytest-xdist: each has its own test database), then the e2e
# tests one at a time: they start servers and measure time, and must not share the CPU with each other.
test: install
	$(PY) manage.py makemigrations --check --dry-run
	GATEWAY_TEST_FUZZ=deep $(PY) -m pytest -q -m "not e2e" -n 2
	$(PY) -m pytest -q -m e2e

# The fast loop: everything but the tests that start real servers.
test-fast: install
	$(PY) -m pytest -q -m "not e2e" -n 2

# Lint (ruff), format check and types (mypy with django-stubs); configured in pyproject.toml.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: install
	$(PY) -m tests.bench

bench-transports: install
	$(PY) -m tests.bench transports

clean:
	rm -rf $(VENV) var
