"""The file formats' JSON Schemas (lgmt_proxy/config/schemas/): valid draft-07, what
the proxy enforces (lgmt_proxy/config/schema.py, jsonschema under our wording,
reports a problem exactly when stock draft-07 does: its wording never drops or
invents one), what the docs show, and in the packages.

No reactor anywhere; ``PackagingTests`` alone runs a subprocess (it builds the
wheel and the sdist to look inside them), kept here beside the schema checks."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from lgmt_proxy.config import schema
from lgmt_proxy.config.clientauth import parse_client_auth
from lgmt_proxy.config.routesfile import parse_routes
from lgmt_proxy.rules.policy import ALLOWED_METHODS

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "lgmt_proxy" / "config" / "schemas"
NAMES = ("client-auth", "routes")
#: Which schema a document is for, by its top-level key.
KEYS = {"consumers": "client-auth", "routes": "routes"}

CLIENT_AUTH = {
    "consumers": [
        {
            "name": "kubecost",
            "token_sha256": hashlib.sha256(b"kubecost-token-0123").hexdigest(),
            "allow": [{"methods": ["GET", "post"], "paths": ["/prometheus/*"]}],
            "rate_limit": {"requests_per_second": 2, "burst": 4},
            "tenant": ["team-a", 42],
        },
        {"name": "alloy", "token": "alloy-token-abcdefgh", "allow": [{"paths": "/otlp/*"}]},
    ]
}
ROUTES = {
    "routes": [
        {
            "name": "mimir-push",
            "prefix": "/api/v1/push",
            "upstream": "https://mimir.example",
            "rewrite": "",
            "credentials": {"type": "basic", "user": "team-a", "token_env": "MIMIR_TOKEN"},
            "tenant": "from_consumer",
        },
        {
            "name": "tempo",
            "prefix": "/tempo",
            "upstream": "https://tempo.example",
            "credentials": {"type": "bearer", "token_file": "/run/secrets/tempo"},
        },
        {"name": "open", "prefix": "/open", "upstream": "https://o.example"},
    ]
}
#: Values put anywhere in the documents above. No .inf/.nan (JSON has none;
#: schema.py refuses them) and no trailing newline (ECMA-262's `$`, which
#: schema.py follows, refuses it; stock jsonschema's Python `$` would not).
VALUES = st.sampled_from(
    [None, True, 0, -1, 1, 2.5, "", "*", "GET", "get", "TRACE", "/x", "x", "a b", "none",
     "basic", "bearer", "team-a", "/metrics", "/a/../b", "/a/", "t" * 20, "0" * 64, "a:b",
     [], ["GET"], ["*"], ["/x"], ["x"], [1], {}, {"type": "none"}, {"type": "bearer"},
     {"requests_per_second": 1}, {"paths": ["/x"]}]
)  # fmt: skip


def draft7(name: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(json.loads((SCHEMAS / f"{name}.schema.json").read_text()))


def paths(doc: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a document: mapping keys and list indexes, nested."""
    found = [at]
    if isinstance(doc, dict):
        for key, value in doc.items():
            found += paths(value, (*at, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            found += paths(value, (*at, i))
    return found


def mutate(doc: Any, path: tuple[Any, ...], value: Any, how: str) -> Any:
    doc = copy.deepcopy(doc)
    if not path:
        return value
    parent = doc
    for part in path[:-1]:
        parent = parent[part]
    if how == "delete":
        del parent[path[-1]]
    elif how == "add" and isinstance(parent, dict):
        parent["extra"] = value
    else:
        parent[path[-1]] = value
    return doc


def examples() -> list[tuple[str, Any]]:
    """``(schema name, document)`` for each file in docs/configuration.md's
    YAML blocks; a block may hold both files (split by top-level key)."""
    text = (ROOT / "docs" / "configuration.md").read_text()
    found = []
    for block in re.findall(r"^```yaml\n(.*?)^```", text, re.M | re.S):
        doc = yaml.safe_load(block)
        if isinstance(doc, dict):
            found += [(KEYS[k], {k: v}) for k, v in doc.items() if k in KEYS]
    return found


class SchemaFileTests(TestCase):
    def test_valid_draft07_with_an_id(self) -> None:
        for name in NAMES:
            raw = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
            jsonschema.Draft7Validator.check_schema(raw)
            self.assertEqual(raw["$schema"], "http://json-schema.org/draft-07/schema#")
            self.assertTrue(raw["$id"].startswith("urn:lgmt-proxy:schema:"), name)
            schema.load(name)

    def test_every_check_is_worded(self) -> None:
        # A pattern or a choice of forms says what is expected, not "wrong form".
        def walk(node: Any, at: str) -> None:
            if isinstance(node, dict):
                if {"pattern", "anyOf", "oneOf", "not"} & set(node) and at.count("/not") == 0:
                    self.assertIn("errorMessage", node, at)
                for key, sub in node.items():
                    walk(sub, f"{at}/{key}")
            elif isinstance(node, list):
                for i, sub in enumerate(node):
                    walk(sub, f"{at}/{i}")

        for name in NAMES:
            walk(json.loads((SCHEMAS / f"{name}.schema.json").read_text()), name)

    def test_keywords_outside_the_subset_refused(self) -> None:
        for text in (
            '{"format": "uri"}',
            '{"patternProperties": {}}',
            '{"$ref": "#/definitions/x", "type": "string", "definitions": {"x": {}}}',
            '{"$ref": "https://example.com/s.json"}',
            '{"additionalProperties": {"type": "string"}}',
            '{"type": "float"}',
        ):
            self.assertRaises((ValueError, KeyError), schema.Schema.from_json, text)

    def test_methods_are_the_seven_in_any_case(self) -> None:
        client_auth = schema.load("client-auth")

        def valid(method: str) -> bool:
            rule = {"methods": [method], "paths": "/"}
            doc = {"consumers": [{"name": "a", "token": "t" * 20, "allow": [rule]}]}
            return not client_auth.problems(doc)

        for m in ALLOWED_METHODS:
            for spelling in (m.decode(), m.decode().lower(), m.decode().title()):
                self.assertTrue(valid(spelling), spelling)
        for bad in ("TRACE", "CONNECT", "GETX", " GET", "GET\n", ""):
            self.assertFalse(valid(bad), bad)

    def test_end_of_input_is_ecma_262s(self) -> None:
        problems = schema.load("client-auth").problems(
            {"consumers": [{"name": "a\n", "token": "t" * 20 + "\n", "allow": [{"paths": "/"}]}]}
        )
        self.assertEqual(
            [schema.where(p.path) for p in problems],
            ["consumers[0].name", "consumers[0].token"],
        )


class AgreementTests(TestCase):
    """schema.py's verdict is stock draft-07's on the documents around the good ones."""

    def check(self, name: str, doc: Any) -> None:
        problems = schema.load(name).problems(doc)
        expected = draft7(name).is_valid(doc)
        self.assertEqual(not problems, expected, (doc, problems))
        for problem in problems:
            self.assertNotIn("\n", problem.message)

    def test_good_documents(self) -> None:
        self.check("client-auth", CLIENT_AUTH)
        self.check("routes", ROUTES)
        self.assertEqual(schema.load("routes").problems(ROUTES), [])

    @settings(max_examples=300, deadline=None)
    @given(st.data())
    def test_mutated_documents(self, data: st.DataObject) -> None:
        name, doc = data.draw(st.sampled_from([("client-auth", CLIENT_AUTH), ("routes", ROUTES)]))
        path = data.draw(st.sampled_from(paths(doc)))
        how = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if how == "delete" and not path:
            how = "replace"
        self.check(name, mutate(doc, path, data.draw(VALUES), how))


class DocsExampleTests(TestCase):
    def test_every_example_validates(self) -> None:
        found = examples()
        self.assertGreaterEqual(sorted(n for n, _ in found).count("client-auth"), 2, found)
        self.assertGreaterEqual(sorted(n for n, _ in found).count("routes"), 2, found)
        for name, doc in found:
            self.assertEqual(schema.load(name).problems(doc), [], doc)
            self.assertTrue(draft7(name).is_valid(doc), doc)
            if name == "client-auth":
                parse_client_auth(json.dumps(doc))
            else:
                parse_routes(doc, {"MIMIR_TOKEN": "mimir-token"}, allow_insecure=False)


class PackagingTests(TestCase):
    """The wheel and the sdist carry the schemas (package data, not code)."""

    def test_wheel_and_sdist_hold_the_schemas(self) -> None:
        tree = Path(self.mktemp())
        tree.mkdir()
        for name in ("setup.py", "pyproject.toml", "LICENSE"):
            shutil.copy(ROOT / name, tree)
        ignore = shutil.ignore_patterns("__pycache__", "dropin.cache")
        shutil.copytree(ROOT / "lgmt_proxy", tree / "lgmt_proxy", ignore=ignore)
        shutil.copytree(ROOT / "twisted", tree / "twisted", ignore=ignore)
        build = (
            "from setuptools import build_meta as b; b.build_wheel('dist'); b.build_sdist('dist')"
        )
        subprocess.run([sys.executable, "-c", build], cwd=tree, capture_output=True, check=True)
        (wheel,) = (tree / "dist").glob("*.whl")
        (sdist,) = (tree / "dist").glob("*.tar.gz")
        with zipfile.ZipFile(wheel) as z:
            in_wheel = set(z.namelist())
        with tarfile.open(sdist) as t:
            in_sdist = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
        for name in NAMES:
            member = f"lgmt_proxy/config/schemas/{name}.schema.json"
            self.assertIn(member, in_wheel)
            self.assertIn(member, in_sdist)


class MessageTests(TestCase):
    maxDiff = None
    """The lines users read: one per problem, at its path, never a value."""

    def test_client_auth_lines(self) -> None:
        token = "secret-token-value-1"
        doc = {
            "consumers": [
                {"name": "bad name", "token": token, "allow": [{"paths": ["/x"]}]},
                {
                    "name": "a",
                    "token": token,
                    "token_sha256": "0" * 64,
                    "allow": [{"methods": ["GET", "FETCH"], "paths": ["/x", "y"], "x": 1}],
                    "rate_limit": {"requests_per_second": 0},
                    "tenant": ["ok", "a b"],
                },
                {"name": "b", "token": "short " + token, "allow": []},
                {"name": "c", "token": token, "allow": [{"paths": "/"}]},
                {"name": "c", "token": token, "allow": [{"paths": "/"}]},
            ]
        }
        with self.assertRaises(Exception) as caught:
            parse_client_auth(json.dumps(doc))
        self.assertEqual(
            caught.exception.problems,  # type: ignore[attr-defined]
            [
                "CLIENT_AUTH_FILE: consumers[0].name: 1-64 letters, digits, '.', '_' or '-'",
                "CLIENT_AUTH_FILE: consumer a: give exactly one of token and token_sha256",
                "CLIENT_AUTH_FILE: consumer a.allow[0]: unknown keys x",
                "CLIENT_AUTH_FILE: consumer a.allow[0].methods[1]: "
                "GET, POST, PUT, DELETE, HEAD, OPTIONS, PATCH (any case) or '*'",
                "CLIENT_AUTH_FILE: consumer a.allow[0].paths[1]: must start with '/'",
                "CLIENT_AUTH_FILE: consumer a.rate_limit.requests_per_second: "
                "must be a positive number",
                "CLIENT_AUTH_FILE: consumer a.tenant[1]: a string of 1-150 letters, digits or "
                "!-_.*'()|, not . or .. (quote numeric ids: YAML reads 0123 as 83)",
                "CLIENT_AUTH_FILE: consumer b.token: at least 16 characters, no whitespace",
                "CLIENT_AUTH_FILE: consumer b.allow: must be a non-empty list of {methods, paths}",
                "CLIENT_AUTH_FILE: consumer c: listed twice",
                "CLIENT_AUTH_FILE: consumer c: shares its token with another consumer",
            ],
        )
        self.assertNotIn(token, "\n".join(caught.exception.problems))  # type: ignore[attr-defined]

    def test_routes_lines(self) -> None:
        doc = {
            "routes": [
                {"name": "a", "prefix": "/metrics", "upstream": "https://a", "tenant": ""},
                {
                    "name": "b",
                    "prefix": "/b",
                    "upstream": "http://remote.example",
                    "credentials": {"type": "basic", "token_env": "NOPE", "user": "u:p"},
                },
                {
                    "name": "c",
                    "prefix": "/b",
                    "upstream": "https://c",
                    "credentials": {"type": "bearer", "user": "u"},
                },
                {"name": "a", "prefix": "/d/", "upstream": "https://d", "rewrite": "d"},
            ]
        }
        with self.assertRaises(Exception) as caught:
            parse_routes(doc, {}, allow_insecure=False)
        self.assertEqual(
            caught.exception.problems,  # type: ignore[attr-defined]
            [
                # In the file's order; a route with a good, unique name is called by it.
                "ROUTES_FILE: routes[0].prefix: /health, /ready and /metrics belong to the proxy",
                "ROUTES_FILE: routes[0].tenant: a non-empty string without control characters, "
                "not . or .. (quote numeric ids: YAML reads 0123 as 83)",
                "ROUTES_FILE: route b: upstream: must be https:// unless the host is loopback "
                "or ALLOW_INSECURE_UPSTREAM=true (the token would travel in clear)",
                "ROUTES_FILE: route b: credentials.token_env: NOPE is not set",
                "ROUTES_FILE: route b: credentials.user: basic needs a user without ':' or spaces",
                "ROUTES_FILE: route c: prefix: /b is used twice",
                "ROUTES_FILE: route c: credentials: give exactly one of token_env and token_file",
                "ROUTES_FILE: route c: credentials.user: bearer takes no user",
                "ROUTES_FILE: routes[3].name: a is used twice",
                "ROUTES_FILE: routes[3].prefix: "
                "a path of whole segments like /api/v1/push (no trailing /)",
                "ROUTES_FILE: routes[3].rewrite: a path like /api/v1/push, or '' to drop the prefix",
            ],
        )
