"""Token rotation through a running proxy on a loopback port (reading and
validating the token file is in tests/pure/test_tokens.py).
"""

from __future__ import annotations

import os

from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from lgmt_proxy.config.tokens import read_token_file, token_source
from tests.support.helpers import (
    ORG,
    ProxyFixture,
    Recorder,
    basic,
    call,
    env_for,
    listen,
    upstream_site,
)


class RotationThroughProxyTests(TestCase):
    async def test_new_requests_use_new_token(self) -> None:
        d = self.mktemp()
        os.makedirs(d)
        path = os.path.join(d, "token")
        with open(path, "w") as f:
            f.write("first-token")
        up = Recorder()
        port = listen(upstream_site(up))
        self.addCleanup(port.stopListening)
        token, _ = read_token_file(path)
        assert token is not None
        source = token_source(token, path)
        # The file's token source, given to the proxy as the service gives it.
        proxy = ProxyFixture(env_for(f"http://127.0.0.1:{port.getHost().port}"), token=source)
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.close()))
        await call(proxy.url + "/tempo/api/search")
        self.assertEqual(up.seen[-1].header(b"authorization"), [basic(ORG["tempo"], "first-token")])
        with open(path + ".new", "w") as f:
            f.write("second-token\n")
        os.replace(path + ".new", path)
        source.poll()
        await call(proxy.url + "/tempo/api/search")
        self.assertEqual(
            up.seen[-1].header(b"authorization"), [basic(ORG["tempo"], "second-token")]
        )
