# lgmt-proxy container image.
#
#   scripts/build-image            build it (docker when a daemon answers, else buildah)
#   scripts/smoke-image            build, run with --sandbox as the chart does, check the
#                                  probes, a proxied request, the compiled data plane,
#                                  the read-only root and a clean exit (0) on SIGTERM
#
# Two stages on debian:bookworm-slim: the first builds a virtualenv with the
# project installed (not editable) using Debian's python3 (3.11), its data
# plane compiled to C extensions by mypyc (setup.py, LGMT_PROXY_MYPYC=1; the
# build CI tests as `make venv-compiled`); the second copies that virtualenv
# onto a base with only python3 and ca-certificates (no compiler, no mypy).
# Every Python package comes from requirements.lock (and pip and setuptools from
# requirements-build.lock, mypy from requirements-mypyc.lock), pinned and
# hash-checked: the same releases CI tests.
# Nothing is written outside /tmp at run time: the Twisted plugin cache is
# generated here and bytecode writing is off, so `readOnlyRootFilesystem: true`
# with an emptyDir at /tmp works.

FROM debian:bookworm-slim AS build

ARG DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Package versions are not pinned: bookworm's point releases replace them, and
# a pin on a version the mirror no longer serves breaks the build.
# python3-dev and build-essential: the C compiler and headers mypyc's output
# needs, in this stage only.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev \
        build-essential ca-certificates \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src

# The dependencies first, from the locks alone (this layer is reused until a
# lock changes), with --require-hashes: a file whose hash is not in the lock is
# refused. Behind a TLS-intercepting proxy, pass its CA bundle as the build
# secret `pip_ca` (scripts/build-image does when PIP_CERT or BUILD_CA_BUNDLE
# names one); a secret never lands in a layer. /opt/build is the compiler's
# virtualenv: the runtime set (mypy reads its types), the build tools and
# mypy; it stays in this stage.
COPY requirements.lock requirements-build.lock requirements-mypyc.lock ./
RUN --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && python3 -m venv /opt/lgmt-proxy \
    && /opt/lgmt-proxy/bin/python -m pip install --no-cache-dir --require-hashes \
        -r requirements-build.lock -r requirements.lock \
    && python3 -m venv /opt/build \
    && /opt/build/bin/python -m pip install --no-cache-dir --require-hashes \
        -r requirements-build.lock -r requirements.lock -r requirements-mypyc.lock

COPY setup.py pyproject.toml LICENSE ./
COPY lgmt_proxy ./lgmt_proxy
COPY twisted ./twisted

# Then the project: a wheel with the data plane compiled, built in /opt/build
# by the locked setuptools and mypy (--no-deps, --no-build-isolation and
# --no-index: nothing more is fetched), installed (not editable) into the
# runtime virtualenv, so it is self-contained and the source tree is left
# behind in this stage; a module meant to be compiled that imports as source
# fails the build. pip and setuptools are build tools, removed afterwards.
RUN LGMT_PROXY_MYPYC=1 /opt/build/bin/python -m pip wheel --no-cache-dir --no-index \
        --no-deps --no-build-isolation --wheel-dir /wheels /src \
    && /opt/lgmt-proxy/bin/python -m pip install --no-cache-dir --no-index --no-deps \
        /wheels/lgmt_proxy-*.whl \
    && /opt/lgmt-proxy/bin/python -m pip uninstall -y setuptools pip \
    && /opt/lgmt-proxy/bin/python -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))' \
    && /opt/lgmt-proxy/bin/python -I -c 'import lgmt_proxy.dataplane.inbound as m, sys; sys.exit(not m.__file__.endswith(".so"))'


FROM debian:bookworm-slim

ARG DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 lgmt \
    && useradd --uid 10001 --gid lgmt --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin lgmt

COPY --from=build /opt/lgmt-proxy /opt/lgmt-proxy

# Bytecode as unchecked-hash .pyc files: always used, never compared with the
# sources (whose copied mtimes would make some look stale and be recompiled in
# memory at every start, the root filesystem being read-only). Then the plugin
# cache, regenerated in this stage so it matches the files as copied: at run
# time Twisted only reads it (it would otherwise log that it cannot write it).
RUN /opt/lgmt-proxy/bin/python -m compileall -q -f -j 0 --invalidation-mode unchecked-hash \
        /opt/lgmt-proxy/lib \
    && /opt/lgmt-proxy/bin/python -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))' \
    && /opt/lgmt-proxy/bin/twistd lgmt-proxy --help > /dev/null

ENV PATH=/opt/lgmt-proxy/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp

USER 10001:10001
WORKDIR /tmp
EXPOSE 8085
STOPSIGNAL SIGTERM

# twistd itself is PID 1 (exec form: no shell, no eval). It stops the reactor
# on SIGTERM after the drain (SHUTDOWN_DELAY_SECONDS + SHUTDOWN_GRACE_SECONDS)
# and exits 0. Arguments after the image name go to lgmt-proxy, e.g. --sandbox.
ENTRYPOINT ["/opt/lgmt-proxy/bin/twistd", "--nodaemon", "--pidfile=", "lgmt-proxy"]
