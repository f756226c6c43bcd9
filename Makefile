# Every target bootstraps .venv from the hashed lock file, so a machine with only
# Python 3.11+ and make can run them. The stamp file reinstalls when the lock changes.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: dev cli test lint typecheck check bench lock clean

$(STAMP): requirements-dev.lock pyproject.toml
	@echo "Installing the pinned dependencies into $(VENV) (first run, or the lock changed; about a minute) ..."
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes -r requirements-dev.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Ports of `make dev` (API 8000, Redis 6379, SMTP capture 1025): `make dev PORT=8001`.
# Taken from the command line only: SMTP_PORT and friends exported for the service itself
# (say, from .env) must not move the dev runner's ports.
cmdline = $(if $(filter command line,$(origin $(1))),$($(1)))
DEV_ARGS = $(if $(call cmdline,PORT),--port $(PORT)) \
           $(if $(call cmdline,REDIS_PORT),--redis-port $(REDIS_PORT)) \
           $(if $(call cmdline,SMTP_PORT),--smtp-port $(SMTP_PORT))

dev: $(STAMP)  ## run API, worker, Redis and an SMTP capture server on this machine
	$(BIN)/emailq dev $(strip $(DEV_ARGS))

# The CLI without activating the venv: `make cli ARGS="stats"`, `make cli ARGS="failed --json"`.
# With `make dev REDIS_PORT=...`, give the same REDIS_PORT here (or export the REDIS_URL
# that `make dev` prints).
cli: $(STAMP)  ## run `emailq $(ARGS)` against REDIS_URL (default: make dev's Redis)
	$(if $(call cmdline,REDIS_PORT),REDIS_URL=redis://127.0.0.1:$(REDIS_PORT)/0) $(BIN)/emailq $(ARGS)

# The suite on every core (pytest-xdist), then the load-sensitive tests (marker `serial`)
# alone. `--dist load` hands out single tests: schemathesis' cases share one node id, and
# the schedulers that group by file or mark would run only one of them.
test: $(STAMP) lint typecheck  ## the whole suite, plus ruff and mypy
	$(BIN)/pytest -n auto --dist load -m "not performance and not serial"
	$(BIN)/pytest -m "serial and not performance"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# The peers pin redis below ours (arq 0.28: redis<6; saq 0.26: redis<8), so each gets its
# own venv from its own hashed lock. bench/drain.py skips a peer whose venv is missing.
PEERS := arq saq
PEER_STAMPS := $(foreach p,$(PEERS),.venv-$(p)/.installed)
.venv-%/.installed: bench/requirements-%.lock
	test -x .venv-$*/bin/python || $(PYTHON) -m venv .venv-$*
	.venv-$*/bin/python -m pip install --quiet --disable-pip-version-check --require-hashes -r $<
	touch $@

bench: $(STAMP) $(PEER_STAMPS)  ## figures as ratios to references measured in the same run
	$(BIN)/python -m bench
	$(BIN)/python -m bench.api_cost
	$(BIN)/python -m bench.metrics_cost
	$(BIN)/python -m bench.capacity
	$(BIN)/python -m bench.replicas

# Re-resolve the pins (needs network). The project itself is installed editable by the
# bootstrap, so its own `file://` line is dropped from the lock.
lock:
	$(BIN)/python -m pip install --quiet pip-tools
	$(BIN)/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras --extra test -o requirements-dev.lock pyproject.toml
	$(BIN)/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras -o requirements.lock pyproject.toml
	sed -i -e '/^emailq @ file:/d' -e '/^# WARNING: pip install will require/d' \
	    -e '/^# Consider using a hashable URL/d' requirements-dev.lock requirements.lock
	for p in $(PEERS); do $(BIN)/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
	    -o bench/requirements-$$p.lock bench/requirements-$$p.in; done
	$(BIN)/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras -o requirements-build.lock requirements-build.in

clean:
	rm -rf $(VENV) $(foreach p,$(PEERS),.venv-$(p)) .emailq-dev .pytest_cache .mypy_cache .ruff_cache
