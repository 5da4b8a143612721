# lgmt-proxy: `make run` and `make test` do all the set-up on a fresh machine
# with Python 3.11+ (Debian/Ubuntu: apt-get install python3-venv make).
#
#   make venv    create .venv/ and install the project (editable) and test tools,
#                all from the lock files (pinned, hash-checked)
#   make runtime only what running needs (what `make run` installs)
#   make run     run the proxy: a .env file if present, else the environment if it
#                configures an upstream (GRAFANA_CLOUD_*, ROUTES_FILE), else the
#                sandbox (no Grafana Cloud account needed); it says which, and why
#   make lint    ruff check + ruff format --check
#   make test    lint, mypy, then the whole trial suite
#   make venv-compiled  .venv-mypyc/: the same, with the data plane compiled by
#                mypyc (the container image's build; needs gcc, python3-dev)
#   make test-compiled  the whole trial suite against .venv-mypyc/
#   make bench   the benchmark, pure and compiled builds side by side (not a test)
#   make clean   remove .venv/ and everything generated
#   make lock    regenerate the requirements*.lock files from the ranges in setup.py
#                and requirements-*.txt (needs the package index)
#
# Variables: PYTHON (interpreter for the venv, default python3, needs >= 3.11),
# TESTS (what trial runs, default tests), ARGS (extra `lgmt-proxy` options for
# `make run`, e.g. ARGS=--admin-listen=tcp:9090), LISTEN (the endpoint `make run`
# listens on; default loopback only, tcp:port=$PORT:interface=127.0.0.1 with PORT
# from .env or the environment, 8085 if unset; LISTEN=tcp:8085 for every IPv4
# address), VENV (where `make venv` installs,
# default .venv, e.g. VENV=/tmp/v1 to try the install elsewhere), LOCK_ARGS (extra
# `uv pip compile` options for `make lock`, e.g. --upgrade).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.runtime
STAMP := $(VENV)/.installed
LINT_PATHS := lgmt_proxy tests twisted
TESTS ?= tests
ARGS ?=
LISTEN ?=
# pip without the progress of every package: errors and warnings only.
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: venv runtime lock lint test run bench clean venv-compiled test-compiled

venv: $(STAMP)
runtime: $(RUNTIME)

# Two stamps, each rebuilt only when the packaging or its lock file changes (or
# .venv/ is gone), so `make test`/`make run` cost nothing extra when nothing
# changed. $(RUNTIME) is what `make run` needs: requirements.lock (the runtime
# set) and requirements-build.lock (pip, setuptools), each pinned with its
# hashes. The project itself then comes from this tree with --no-deps and
# --no-build-isolation: the locked setuptools builds it, nothing unhashed is
# fetched. editable_mode=compat (a plain path entry) is what lets Twisted find
# the plugin in twisted/plugins/ (the default mode's import hook hides it);
# its deprecation warning (a dozen lines at every install) is filtered by its
# exact text: the locked setuptools has the mode, and a release without it,
# should `make lock` ever pick one, fails loudly ("Invalid editable mode"). The
# plugin cache is then refreshed once, so that twistd need not write it at
# every start.
$(RUNTIME): setup.py requirements.lock requirements-build.lock
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
	@echo "make: installing what the proxy needs into $(VENV)/ (requirements.lock, hash-checked)"
	@$(PIP) --require-hashes -r requirements.lock -r requirements-build.lock
	@PYTHONWARNINGS='ignore:Compat editable installs' $(PIP) --no-deps --no-build-isolation \
		--config-settings editable_mode=compat -e .
	@$(BIN)/python -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'
	@touch $@

# The test and lint tools on top: requirements-dev.lock holds the runtime and
# build sets again (same pins) and the tools, each with its hashes.
$(STAMP): $(RUNTIME) requirements-dev.lock
	@echo "make: installing the test tools into $(VENV)/ (requirements-dev.lock, hash-checked)"
	@$(PIP) --require-hashes -r requirements-dev.lock
	@touch $@

# Regenerate every lock file from the ranges (setup.py, requirements-*.txt), with
# the hash of every file of every pinned release. uv, pinned, runs from a
# throwaway venv, for Python 3.11 on any platform (--universal), reading no uv
# configuration. Pins already in a lock are kept where the ranges allow them:
# LOCK_ARGS=--upgrade moves everything to the newest releases,
# LOCK_ARGS='--upgrade-package ruff' one package. Each later lock is resolved
# with the earlier ones as constraints, so a package shared by two locks has the
# same version in both and all of them install into one venv.
UV_VERSION := 0.13.9
LOCK_ARGS ?=
UV_COMPILE = "$$tmp/bin/uv" pip compile --quiet --no-config --universal --python-version 3.11 \
	--generate-hashes --custom-compile-command 'make lock' $(LOCK_ARGS)

lock:
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	"$(PYTHON)" -m venv "$$tmp"; \
	"$$tmp/bin/python" -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION); \
	echo "make lock: requirements.lock (runtime: setup.py)"; \
	$(UV_COMPILE) setup.py -o requirements.lock; \
	echo "make lock: requirements-build.lock (pip, setuptools)"; \
	$(UV_COMPILE) requirements-build.txt -o requirements-build.lock; \
	echo "make lock: requirements-dev.lock (runtime + build + test tools)"; \
	$(UV_COMPILE) setup.py requirements-build.txt requirements-dev.txt \
		-c requirements.lock -c requirements-build.lock -o requirements-dev.lock; \
	echo "make lock: requirements-mypyc.lock (mypy for mypyc, pins of requirements-dev.lock)"; \
	$(UV_COMPILE) requirements-mypyc.txt -c requirements-dev.lock -o requirements-mypyc.lock; \
	echo "make lock: requirements-e2e.lock (end-to-end peers)"; \
	$(UV_COMPILE) requirements-e2e.txt -c requirements-dev.lock -o requirements-e2e.lock; \
	echo "make lock: requirements-ship.lock (scripts/ci-ship tools)"; \
	$(UV_COMPILE) requirements-ship.txt -c requirements-dev.lock -c requirements-e2e.lock \
		-o requirements-ship.lock

# The compiled build (setup.py: LGMT_PROXY_MYPYC=1), as the image has it, in
# its own venv beside .venv/: the locks' releases, hash-checked (mypy from
# requirements-mypyc.lock compiles), then the project built as a wheel and
# installed, not editable, since an editable install would import the sources.
# The tests import lgmt_proxy from there and find `tests` through a path
# entry holding nothing else (tests-root/, appended after site-packages by a
# .pth file): the tree's lgmt_proxy/ is never on sys.path. The build is redone
# from scratch whenever a source changes (build/ is removed first: setuptools
# would pack a module no longer compiled from a stale build/lib). Last, each
# module setup.py compiles must import as an extension, and no other, or the
# target fails.
CVENV := .venv-mypyc
CBIN := $(CVENV)/bin
CSTAMP := $(CVENV)/.installed
CPIP := $(CBIN)/python -m pip install --quiet --disable-pip-version-check
PACKAGE_SOURCES := $(shell find lgmt_proxy twisted -name '*.py' -o -name '*.json')

venv-compiled: $(CSTAMP)

$(CSTAMP): setup.py pyproject.toml requirements.lock requirements-build.lock requirements-dev.lock \
		requirements-mypyc.lock $(PACKAGE_SOURCES)
	@if ! $(CBIN)/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then \
		echo "make: creating $(CVENV)/ with $(PYTHON) ($$($(PYTHON) --version 2>&1))"; \
		$(PYTHON) -m venv --clear $(CVENV); \
	fi
	@echo "make: installing the locked sets into $(CVENV)/ (hash-checked)"
	@$(CPIP) --require-hashes -r requirements-dev.lock -r requirements-mypyc.lock
	@echo "make: compiling the data plane with mypyc into $(CVENV)/ (a minute or two)"
	@rm -rf build
	@LGMT_PROXY_MYPYC=1 $(CPIP) --no-deps --no-build-isolation --no-index --force-reinstall . \
		|| { echo "make: the mypyc build failed (a C compiler and python3-dev are needed)" >&2; exit 1; }
	@mkdir -p $(CVENV)/tests-root && ln -sfn "$(CURDIR)/tests" $(CVENV)/tests-root/tests
	@$(CBIN)/python -c 'import site, sys; open(site.getsitepackages()[0] + "/lgmt-proxy-tests.pth", "w").write(sys.argv[1] + "\n")' \
		"$(abspath $(CVENV))/tests-root"
	@$(CBIN)/python -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'
	@LGMT_PROXY_MYPYC=1 $(CBIN)/python -I -m tests.support.build
	@touch $@

# The suite against the compiled build; LGMT_PROXY_MYPYC=1 tells
# tests/pure/test_build.py to require the extensions.
test-compiled: venv-compiled
	LGMT_PROXY_MYPYC=1 $(CBIN)/trial $(TESTS)

lint: venv
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

test: venv lint
	$(BIN)/mypy
	$(BIN)/trial $(TESTS)

# `exec`, and python execs twistd, so that Ctrl-C and SIGTERM reach twistd
# itself: it drains and exits 0, so make prints no "Interrupt" line, and a
# second Ctrl-C stops it at once. lgmt_proxy/sandbox.py `plan_run` chooses
# .env, the environment or the sandbox and says why; it listens on loopback
# only unless LISTEN says otherwise (a proxy holding the real token must not
# be reachable from the network by accident; the container image listens on
# every address).
run: runtime
	@if [ -f .env ]; then set -a; . ./.env; set +a; dotenv=--dotenv; else dotenv=; fi; \
	exec $(BIN)/python -m lgmt_proxy.sandbox $$dotenv --listen='$(LISTEN)' -- $(ARGS)

# The benchmark (nginx, wrk; not a test). BENCH_ARGS=--quick for a short run.
# Both builds in the same rounds: A is the pure package (.venv/), B the
# compiled one the image ships (.venv-mypyc/, `--compare-twistd`);
# BENCH_COMPILED=no runs the pure build alone (no C compiler needed).
BENCH_ARGS ?=
BENCH_COMPILED ?= yes
ifeq ($(BENCH_COMPILED),yes)
bench: venv venv-compiled
	$(BIN)/python bench/run.py --compare-twistd $(CVENV)/bin/twistd $(BENCH_ARGS)
else
bench: venv
	$(BIN)/python bench/run.py $(BENCH_ARGS)
endif

clean:
	rm -rf $(VENV) $(CVENV) build dist *.egg-info _trial_temp* \
		.mypy_cache .ruff_cache .hypothesis twisted/plugins/dropin.cache .ci/*.log
	find $(LINT_PATHS) -name __pycache__ -type d -prune -exec rm -rf {} +
