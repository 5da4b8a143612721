# lgmt-proxy: `make run` and `make test` do all the set-up on a fresh machine
# with Python 3.11+ (Debian/Ubuntu: apt-get install python3-venv make).
#
#   make venv    create .venv/ and install the project (editable) and test tools
#   make run     run the proxy: a .env file if present, else the environment if it
#                holds a token, else the sandbox (no Grafana Cloud account needed)
#   make lint    ruff check + ruff format --check
#   make test    lint, mypy, then the whole trial suite
#   make clean   remove .venv/ and everything generated
#
# Variables: PYTHON (interpreter for the venv, default python3, needs >= 3.11),
# TESTS (what trial runs, default tests), ARGS (extra `lgmt-proxy` options for
# `make run`, e.g. ARGS=--admin-listen=tcp:9090).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LINT_PATHS := lgmt_proxy tests twisted
TESTS ?= tests
ARGS ?=
TWISTD := $(BIN)/twistd -n --pidfile= lgmt-proxy

.PHONY: venv lint test run bench clean

venv: $(STAMP)

# Rebuilt only when the packaging or the tool list changes (or .venv/ is gone),
# so `make test`/`make run` cost nothing extra when nothing changed.
$(STAMP): setup.py requirements-dev.txt
	@py='$(PYTHON)'; \
	if ! "$$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then \
		if command -v python3.11 >/dev/null 2>&1; then py=python3.11; else \
			echo "make: $(PYTHON) is missing or older than 3.11; install Python 3.11+ or set PYTHON=" >&2; \
			exit 1; \
		fi; \
	fi; \
	if ! $(BIN)/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then \
		echo "make: creating $(VENV)/ with $$py ($$("$$py" --version 2>&1))"; \
		"$$py" -m venv --clear $(VENV) || { \
			echo "make: '$$py -m venv' failed (Debian/Ubuntu: apt-get install python3-venv)" >&2; \
			exit 1; \
		}; \
	fi
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --config-settings editable_mode=compat -e . -r requirements-dev.txt
	$(BIN)/python -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'
	@touch $@

lint: venv
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

test: venv lint
	$(BIN)/mypy
	$(BIN)/trial $(TESTS)

# `exec` so that Ctrl-C / SIGTERM reach twistd itself (graceful drain, exit 0).
run: venv
	@if [ -f .env ]; then \
		echo "make run: using the variables in .env"; \
		set -a; . ./.env; set +a; \
		exec $(TWISTD) $(ARGS); \
	elif [ -n "$${GRAFANA_CLOUD_ACCESS_TOKEN:-}" ] || [ -n "$${GRAFANA_CLOUD_ACCESS_TOKEN_FILE:-}" ]; then \
		echo "make run: using the environment"; \
		exec $(TWISTD) $(ARGS); \
	else \
		echo "make run: no .env and no GRAFANA_CLOUD_ACCESS_TOKEN(_FILE) set: starting the sandbox"; \
		exec $(TWISTD) --sandbox $(ARGS); \
	fi

# The benchmark (nginx, wrk; not a test). BENCH_ARGS=--quick for a short run.
BENCH_ARGS ?=
bench: venv
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info _trial_temp* \
		.mypy_cache .ruff_cache .hypothesis twisted/plugins/dropin.cache .ci/*.log
	find $(LINT_PATHS) -name __pycache__ -type d -prune -exec rm -rf {} +
