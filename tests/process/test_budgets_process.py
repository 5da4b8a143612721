"""Two real ``twistd -n lgmt-proxy`` processes sharing one consumer's budget
through a password-protected redis-server, configured as operators do:
RATE_LIMIT_REDIS_URL and RATE_LIMIT_REDIS_PASSWORD_FILE."""

from __future__ import annotations

import json
import os

from twisted.trial.unittest import TestCase

from tests.support.helpers import (
    ProxyProcess,
    Recorder,
    call,
    env_for,
    free_port,
    listen,
    sleep,
    spawn_proxy,
    upstream_site,
)
from tests.support.redisserver import RedisServer

PASSWORD = "redis-process-test-passw0rd"
TOKEN = "shared-budget-token-0123456789"


class SharedBudgetProcessTests(TestCase):
    timeout = 90

    async def test_two_processes_one_budget(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        redis = RedisServer(os.path.join(directory, "redis"), password=PASSWORD)
        self.addCleanup(redis.stop)
        up = Recorder()
        port = listen(upstream_site(up))
        self.addCleanup(port.stopListening)
        auth_path = os.path.join(directory, "clients.yaml")
        with open(auth_path, "w") as f:
            f.write(
                "consumers:\n  - name: team-a\n"
                f"    token: {TOKEN}\n"
                "    allow: [{paths: ['/loki/*']}]\n"
                "    rate_limit: {requests_per_second: 0.01, burst: 3}\n"
            )
        password_path = os.path.join(directory, "redis-password")
        with open(password_path, "w") as f:
            f.write(PASSWORD + "\n")
        env = env_for(
            f"http://127.0.0.1:{port.getHost().port}",
            CLIENT_AUTH_FILE=auth_path,
            RATE_LIMIT_REDIS_URL=f"redis://127.0.0.1:{redis.port}/0",
            RATE_LIMIT_REDIS_PASSWORD_FILE=password_path,
            SHUTDOWN_DELAY_SECONDS="0",
        )
        procs: list[tuple[ProxyProcess, int]] = []
        for _ in range(2):
            admin = free_port()
            proc = await spawn_proxy(env, "--admin-listen", f"tcp:{admin}:interface=127.0.0.1")
            self.addCleanup(proc.stop)
            procs.append((proc, admin))
        for _proc, admin in procs:
            for _ in range(100):
                _, body = await call(f"http://127.0.0.1:{admin}/metrics")
                if b"proxy_ratelimit_shared 1.0" in body:
                    break
                await sleep(0.05)
            self.assertIn(b"proxy_ratelimit_shared 1.0", body)
        headers = {b"Authorization": [b"Bearer " + TOKEN.encode()]}
        codes = []
        for i in range(6):
            response, _ = await call(procs[i % 2][0].url + "/loki/api/v1/labels", headers=headers)
            codes.append(response.code)
        self.assertEqual(codes, [200, 200, 200, 429, 429, 429])
        self.assertEqual(len(up.seen), 3)
        for proc, _ in procs:
            proc.signal("TERM")
            self.assertEqual(await proc.ended, 0)
            out = proc.output.decode()
            self.assertNotIn(PASSWORD, out)
            events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
            self.assertTrue(
                any(
                    "budgets shared through Redis at redis://127.0.0.1" in e["msg"] for e in events
                ),
                out,
            )
