# The two commands: `make run` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
FLASK := $(BIN)/flask

.PHONY: install install-dev run test lint format clean bench bench-smoke soak

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

# The checkout itself too, editable: .venv/bin/pubsub runs `pubsub serve`, `pubsub db upgrade`, ...
# from any directory (pubsub/__main__.py), with this checkout's code and migrations.
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

# Serve the API on 127.0.0.1:8000 (PUBSUB_* variables apply); without PUBSUB_DATABASE_URL the
# embedded PostgreSQL keeps its data under instance/pgdata.
run: install
	$(FLASK) db upgrade
	$(FLASK) pubsub serve

test: install-dev
	$(BIN)/pytest

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install-dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# Load benchmarks (bench/README.md): starts the app on an embedded PostgreSQL of its own, runs
# every scenario over HTTP and as raw SQL, prints one JSON line per run, a table and HTTP/raw ratios.
# Options go through BENCH_ARGS, e.g. make bench BENCH_ARGS="publish_batch --threads 4,8,16".
BENCH_ARGS ?=

bench: install
	$(BIN)/python -m bench --compare-raw $(BENCH_ARGS)

# About 30 s: every scenario for 1.5 s each way, every check enforced; exits non-zero when one
# fails. CI runs it so the bench cannot rot. The bench stops the app itself; timeout is a backstop.
bench-smoke: install
	timeout 240 $(BIN)/python -m bench --smoke --compare-raw $(BENCH_ARGS)

# A long steady run (not in CI): publish and consume at a fixed rate with the cleanup jobs running,
# a report every 30 s, and at the end lost = 0 and pending = 0 or exit 1 (bench/README.md).
SOAK_MINUTES ?= 20
SOAK_ARGS ?=

soak: install
	$(BIN)/python -m bench.soak --minutes $(SOAK_MINUTES) $(SOAK_ARGS)
