"""The built-in echo upstream behind ``--sandbox``: it answers every request
with what it received (method, path, query, headers with the token masked), so
anyone can see exactly what the proxy would send to Grafana Cloud.

Also `make run`'s choice between ``.env``, the environment and the sandbox
(`plan_run`, run by ``python -m lgmt_proxy.sandbox``): the sandbox is what it
starts when nothing is configured, and it must say so, and what it ignores.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import attrs
from twisted.web.resource import Resource
from twisted.web.server import Site

SANDBOX_TOKEN = "sandbox-token-not-a-secret"


def mask_authorization(value: bytes) -> str:
    """``Basic <user>:***``: shows which org id was sent, never the token."""
    scheme, _, creds = value.partition(b" ")
    if scheme.lower() == b"basic":
        try:
            user = base64.b64decode(creds, validate=True).split(b":", 1)[0]
            return f"Basic {user.decode('utf-8', 'replace')}:***"
        except ValueError:
            pass
    return f"{scheme.decode('latin-1')} ***"


class Echo(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        headers: dict[str, list[str]] = {}
        for name, values in request.requestHeaders.getAllRawHeaders():
            key = name.decode("latin-1")
            if name.lower() == b"authorization":
                headers[key] = [mask_authorization(v) for v in values]
            else:
                headers[key] = [v.decode("latin-1") for v in values]
        path, _, query = request.uri.partition(b"?")
        request.content.seek(0, 2)
        body = {
            "sandbox": True,
            "method": request.method.decode("latin-1"),
            "path": path.decode("latin-1"),
            "query": query.decode("latin-1"),
            "headers": headers,
            "body_bytes": request.content.tell(),
        }
        data = json.dumps(body, indent=2).encode() + b"\n"
        request.setHeader(b"Content-Type", b"application/json")
        return data


def sandbox_site() -> Site:
    site = Site(Echo())
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]
    return site


#: The sandbox runs on a laptop, not behind a load balancer: the listener
#: closes at once on Ctrl-C, and requests in flight get a short grace. Values
#: the user set win.
SANDBOX_DRAIN = {"SHUTDOWN_DELAY_SECONDS": "0", "SHUTDOWN_GRACE_SECONDS": "3"}


def replaced_by_sandbox(name: str) -> bool:
    """Whether ``--sandbox`` ignores this variable: it brings its own signals,
    token and org ids, and a route table would replace them."""
    return name.startswith("GRAFANA_CLOUD_") or name == "ROUTES_FILE"


def sandbox_env(env: Mapping[str, str], port: int) -> dict[str, str]:
    """The environment of a sandbox: ``env`` less what the sandbox replaces,
    every signal pointed at the echo upstream on ``port``, a short drain."""
    kept = {k: v for k, v in env.items() if not replaced_by_sandbox(k)}
    echo = {"GRAFANA_CLOUD_ACCESS_TOKEN": SANDBOX_TOKEN}
    for signal in ("PROMETHEUS", "LOKI", "TEMPO", "OTLP", "PROFILES"):
        echo[f"GRAFANA_CLOUD_{signal}_URL"] = f"http://127.0.0.1:{port}"
        echo[f"GRAFANA_CLOUD_{signal}_ORG_ID"] = f"sandbox-{signal.lower()}"
    return {**SANDBOX_DRAIN, **kept, **echo}


@attrs.frozen
class RunPlan:
    """What `make run` starts, and the lines that tell the user why."""

    sandbox: bool
    says: tuple[str, ...]


def _names(names: Sequence[str], most: int = 4) -> str:
    shown = ", ".join(names[:most])
    return shown if len(names) <= most else f"{shown} and {len(names) - most} more"


def plan_run(env: Mapping[str, str], *, dotenv: bool, args: Sequence[str]) -> RunPlan:
    """`make run`'s choice, given the environment (``.env`` already sourced
    into it when ``dotenv``) and the ``ARGS`` for lgmt-proxy: ``.env`` if
    there is one; else the environment when it configures an upstream (a
    token, a signal or ROUTES_FILE: a route table brings its own credentials,
    and a half-done configuration should get the proxy's own errors, not a
    sandbox that silently ignores it); else the sandbox. Names only, never
    values."""
    ours = sorted(k for k, v in env.items() if replaced_by_sandbox(k) and v)
    # The ones that say most first.
    first = ("GRAFANA_CLOUD_ACCESS_TOKEN", "GRAFANA_CLOUD_ACCESS_TOKEN_FILE", "ROUTES_FILE")
    ours = [n for n in first if n in ours] + [n for n in ours if n not in first]
    if "--sandbox" in args:
        says = ["make run: starting the sandbox (--sandbox in ARGS)"]
        if ours:
            says.append(f"make run: the sandbox ignores {_names(ours)}")
    elif dotenv or ours:
        verb = "is" if len(ours) == 1 else "are"
        why = (
            "from .env (ARGS=--sandbox for the sandbox)"
            if dotenv
            else f"from the environment: {_names(ours)} {verb} set"
        )
        return RunPlan(False, (f"make run: configuration {why}",))
    else:
        says = [
            "make run: no .env, no GRAFANA_CLOUD_* or ROUTES_FILE set: starting the sandbox "
            "(a built-in echo upstream; nothing leaves this machine)"
        ]
    if env.get("CLIENT_AUTH_FILE"):
        says.append("make run: the sandbox keeps CLIENT_AUTH_FILE: clients must authenticate")
    return RunPlan(True, tuple(says))


def run_listen(env: Mapping[str, str]) -> str:
    """`make run`'s endpoint unless LISTEN says otherwise: PORT on loopback
    only. A proxy holding the real token must not be reachable from the
    network (or a browser's DNS-rebinding page) by accident."""
    port = env.get("PORT") or "8085"
    return f"tcp:port={port}:interface=127.0.0.1:backlog=1024"


def main(argv: Sequence[str]) -> NoReturn:
    """``make run`` (after sourcing ``.env``): ``[--dotenv] [--listen=ENDPOINT]
    [-- ARGS]``. Prints the choice and execs twistd, so that Ctrl-C and SIGTERM
    reach the proxy itself."""
    import os
    import shlex
    import sys

    dotenv, listen, args = False, "", list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--":
            break
        if arg == "--dotenv":
            dotenv = True
        elif arg.startswith("--listen="):
            listen = arg.partition("=")[2]
        else:
            sys.exit(f"make run: unknown option {arg}")
    plan = plan_run(os.environ, dotenv=dotenv, args=args)
    listen = listen or run_listen(os.environ)
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    command = ["-n", "--pidfile=", "lgmt-proxy", "--listen", listen, *args]
    if plan.sandbox and "--sandbox" not in args:
        command.append("--sandbox")
    for line in plan.says:
        print(line)
    print(f"make run: {shlex.join([os.path.relpath(twistd), *command])}", flush=True)
    os.execv(twistd, [twistd, *command])


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
