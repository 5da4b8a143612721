"""Proxy credentials never leave the process except in ``Proxy-Authorization``
to the proxy: ``twistd lgmt-proxy`` with credentials in HTTPS_PROXY, in
UPSTREAM_PROXY_CREDENTIALS_FILE and in a route's own proxy URL, a proxy that
refuses every CONNECT and one that is down; nothing it prints, serves or
answers holds a password."""

from __future__ import annotations

import base64
import json
import os

from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from tests.support.helpers import call, free_port, listen, spawn_proxy

ENV_SECRET = "env-pr0xy-s3cret"
FILE_SECRET = "file-pr0xy-s3cret"
ROUTE_SECRET = "route-pr0xy-s3cret"
UPSTREAM = "https://grafana-cloud.lgmt-egress.test"


class _Refuser(protocol.Protocol):
    """A forward proxy that answers every CONNECT with 407."""

    def __init__(self, heads: list[bytes]) -> None:
        self.heads = heads
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n\r\n" in self.buffer:
            self.heads.append(self.buffer)
            assert self.transport is not None
            self.transport.write(
                b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                b'Proxy-Authenticate: Basic realm="corp"\r\nContent-Length: 0\r\n\r\n'
            )
            self.transport.loseConnection()


class CredentialsNeverShownTests(TestCase):
    timeout = 60

    async def test_refusing_and_dead_proxies(self) -> None:
        heads: list[bytes] = []
        refuser = listen(protocol.Factory.forProtocol(lambda: _Refuser(heads)))
        self.addCleanup(refuser.stopListening)
        refuser_port = refuser.getHost().port
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        credentials_file = os.path.join(d, "proxy-credentials")
        with open(credentials_file, "w") as f:
            f.write(f"fileuser:{FILE_SECRET}\n")
        routes_file = os.path.join(d, "routes.yaml")
        dead_port = free_port()
        dead = f"http://routeuser:{ROUTE_SECRET}@127.0.0.1:{dead_port}"
        with open(routes_file, "w") as f:
            f.write(
                "routes:\n"
                f"  - {{name: environment, prefix: /environment, upstream: {UPSTREAM}}}\n"
                f"  - {{name: dead, prefix: /dead, upstream: {UPSTREAM}, proxy: '{dead}'}}\n"
                f"  - {{name: bare, prefix: /bare, upstream: {UPSTREAM},"
                f" proxy: 'http://127.0.0.1:{refuser_port}'}}\n"
            )
        env = {
            "ROUTES_FILE": routes_file,
            "HTTPS_PROXY": f"http://envuser:{ENV_SECRET}@127.0.0.1:{refuser_port}",
            "UPSTREAM_PROXY_CREDENTIALS_FILE": credentials_file,
            "LOG_LEVEL": "debug",
            "SHUTDOWN_DELAY_SECONDS": "0",
        }
        proc = await spawn_proxy(env)
        self.addCleanup(lambda: Deferred.fromCoroutine(proc.stop()))
        self.assertIsNone(proc.code, proc.tail())

        answers = []
        for path in ("/environment/x", "/bare/x", "/dead/x"):
            response, body = await call(proc.url + path)
            self.assertEqual(response.code, 502, body)
            answers.append(json.loads(body)["error"])
        self.assertEqual(
            answers,
            [
                "forward proxy refused the connection (407)",
                "forward proxy refused the connection (407)",
                "upstream refused the connection",
            ],
        )
        # The credentials were in play: the file's went to the proxy, twice.
        sent = b"Proxy-Authorization: Basic " + base64.b64encode(f"fileuser:{FILE_SECRET}".encode())
        self.assertEqual([sent in head for head in heads], [True, True])
        _, metrics = await call(proc.url + "/metrics")

        await proc.stop()
        output = proc.output.decode(errors="replace")
        lines = [json.loads(line) for line in output.splitlines() if line.strip()]
        # The start-up lines name each way out without its credentials.
        via = {x["signal"]: x["via"] for x in lines if "via" in x}
        refusing = f"http://127.0.0.1:{refuser_port}"
        self.assertEqual(
            via,
            {"environment": refusing, "bare": refusing, "dead": f"http://127.0.0.1:{dead_port}"},
        )
        # The failure's log line carries the proxy's status.
        self.assertIn(
            "upstream environment failed: proxy: forward proxy refused the connection (407) "
            "(ProxyRefused)",
            [x.get("msg") for x in lines],
            output,
        )
        everything = output + metrics.decode() + "".join(answers)
        for secret in (ENV_SECRET, FILE_SECRET, ROUTE_SECRET):
            for user in ("envuser", "fileuser", "routeuser"):
                encoded = base64.b64encode(f"{user}:{secret}".encode()).decode()
                self.assertNotIn(encoded, everything)
            self.assertNotIn(secret, everything)
