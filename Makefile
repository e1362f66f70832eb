# NovaCron: `make run` starts the whole system locally, `make test` runs the whole suite.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: setup run stop test test-deps bench-deps lint typecheck guest image-debian bench-dwcp bench-migration clean soak faults reliability

setup: $(VENV)/.installed  ## idempotent install step used by run and test

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements-dev.txt
	touch $@

run: setup  ## control plane, control worker, beat, Flower and the local nodes
	scripts/run-local.sh

stop: setup  ## what make run left running: its processes, then each local VM (ACPI powerdown, then quit)
	$(PY) -m workers.node.stop

guest: setup  ## the test guest (kernel + busybox initramfs from Debian packages), registered as image testguest
	$(PY) -m workers.guest.build --out var/images/testguest

image-debian: setup  ## Debian 12 cloud image from Debian's packages (root; mmdebstrap), imported as debian-12
	scripts/system-deps.sh image
	scripts/image-debian.sh

bench-dwcp: bench-deps setup  ## DWCP against nc, rsync and QEMU migration on shaped namespaces and loopback (root)
	$(PY) -m bench.dwcp.bench $(BENCH_ARGS)

bench-migration: bench-deps setup  ## NovaCron live migration vs QEMU alone between two namespaces, test guest and Debian (root; 1-2 h: 5 runs of 7 configurations on 3 links)
	$(PY) -m bench.migration.run $(BENCH_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy .

# The suite runs against a real PostgreSQL (pytest-django creates test_<name> from this URL) and Redis.
# test-deps runs first: as root it installs the Debian packages the suite drives; otherwise it prints
# the apt-get line and stops the run before anything else.
test: export DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/novacron
test: export REDIS_URL ?= redis://127.0.0.1:6379/15
test: test-deps
	$(MAKE) setup lint typecheck
	scripts/ensure-redis.sh
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-deps:
	scripts/system-deps.sh test

bench-deps:
	scripts/system-deps.sh bench

# API benchmark at 1M VMs (issue 7): its own database and Redis db, granian + wrk; not run by `make test`.
bench-api: bench-deps setup  ## BENCH_ARGS="--quick" for a 100k-VM smoke run; results in bench/results/
	$(PY) bench/api/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache

# Ten minutes of mixed API load and continuous live migrations between two nodes (not in CI).
soak: setup
	$(PY) -m bench.soak $(SOAK_ARGS)

# The fault-injection scenarios alone, then docs/RELIABILITY.md rendered from their records.
faults: export DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/novacron
faults: setup
	rm -rf artifacts/faults
	$(VENV)/bin/pytest -m faults tests/faults -q $(PYTEST_ARGS)

reliability: faults
	$(PY) -m tests.faults.report
