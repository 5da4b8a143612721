"""RATE_LIMIT_REDIS_URL, its password file and deadline."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from lgmt_proxy.config.ratelimit import RedisSettings, parse_rate_limit_redis, parse_redis_url
from lgmt_proxy.config.settings import ConfigError, parse_config

BASE = {
    "GRAFANA_CLOUD_ACCESS_TOKEN": "glc_token_value",
    "GRAFANA_CLOUD_LOKI_URL": "https://logs.example.net",
    "GRAFANA_CLOUD_LOKI_ORG_ID": "1",
}


class RedisUrlTests(TestCase):
    def test_forms(self) -> None:
        self.assertEqual(parse_redis_url("redis://redis.svc"), RedisSettings("redis.svc"))
        found = parse_redis_url("rediss://ops:pa%40ss@[::1]:6380/3")
        assert isinstance(found, RedisSettings)
        self.assertEqual(
            (found.host, found.port, found.tls, found.db, found.username),
            ("::1", 6380, True, 3, "ops"),
        )
        self.assertEqual(found.password.reveal() if found.password else None, "pa@ss")
        self.assertEqual(found.display, "rediss://[::1]:6380/3")
        self.assertNotIn("pa@ss", repr(found))

    def test_problems_never_quote_the_password(self) -> None:
        for url, problem in {
            "http://:s3cret@redis": "must start with redis:// or rediss://",
            "redis://:s3cret@": "names no host",
            "redis://:s3cret@redis/x": "the path must be a database number, like /0",
            "redis://:s3cret@redis:99999": "not a URL like redis://redis.example:6379/0",
            "redis://:s3cret@redis?db=1": "takes no query or fragment",
        }.items():
            self.assertEqual(parse_redis_url(url), problem, url)

    def test_environment(self) -> None:
        self.assertEqual(parse_rate_limit_redis({}), (None, []))
        settings, problems = parse_rate_limit_redis(
            {
                "RATE_LIMIT_REDIS_URL": "redis://redis:6379",
                "RATE_LIMIT_REDIS_PASSWORD_FILE": "/run/secrets/redis",
                "RATE_LIMIT_REDIS_TIMEOUT_SECONDS": "0.02",
            }
        )
        self.assertEqual(problems, [])
        assert settings is not None
        self.assertEqual((settings.password_file, settings.timeout), ("/run/secrets/redis", 0.02))
        self.assertEqual(parse_rate_limit_redis({"RATE_LIMIT_REDIS_URL": "redis://r"})[0],
                         RedisSettings("r", timeout=0.05))  # fmt: skip
        with_file = settings.with_password("s3cret\n")
        assert isinstance(with_file, RedisSettings)
        self.assertEqual(with_file.password.reveal() if with_file.password else None, "s3cret")
        self.assertEqual(settings.with_password("\n"), "must hold the password on one line")

    def test_config_problems(self) -> None:
        env = {
            **BASE,
            "RATE_LIMIT_REDIS_URL": "redis://:s3cret@redis",
            "RATE_LIMIT_REDIS_PASSWORD_FILE": "/run/secrets/redis",
            "RATE_LIMIT_REDIS_TIMEOUT_SECONDS": "0",
        }
        with self.assertRaises(ConfigError) as caught:
            parse_config(env)
        self.assertEqual(
            caught.exception.problems,
            [
                "RATE_LIMIT_REDIS_TIMEOUT_SECONDS: must be a number of seconds > 0 and <= 10",
                "RATE_LIMIT_REDIS_PASSWORD_FILE: give the password in it or in "
                "RATE_LIMIT_REDIS_URL, not both",
            ],
        )
        self.assertNotIn("s3cret", "\n".join(caught.exception.problems))
        with self.assertRaises(ConfigError) as caught:
            parse_config({**BASE, "RATE_LIMIT_REDIS_TIMEOUT_SECONDS": "1"})
        self.assertEqual(
            caught.exception.problems,
            ["RATE_LIMIT_REDIS_TIMEOUT_SECONDS: needs RATE_LIMIT_REDIS_URL"],
        )
        config = parse_config({**BASE, "RATE_LIMIT_REDIS_URL": "rediss://redis.svc:6380"})
        self.assertEqual(config.rate_limit_redis, RedisSettings("redis.svc", 6380, tls=True))
