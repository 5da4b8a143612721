"""The user file formats as JSON Schema (``lgmt_proxy/config/schemas/*.schema.json``),
and the validator that reads those files.

The schema files are the single source: the code validates with them, the
docs link to them, editors load them. This is a small interpreter of the
draft-07 subset they use, not a library, because what users get from it is
the point: every problem in the file (a library such as fastjsonschema stops
at the first), each one line at its path, worded by the schema's own
``errorMessage`` (the keyword VS Code's JSON and YAML servers show too), never
the offending value (it may be a token). A keyword outside the subset makes
loading fail, so a schema cannot say more than the proxy checks;
tests/pure/test_schema.py holds a real draft-07 validator to the same verdicts.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping
from importlib import resources
from typing import Any

import attrs

Path = tuple[str | int, ...]

#: Keywords that only annotate: editors show them, validation skips them.
_ANNOTATIONS = frozenset(
    {"$schema", "$id", "$comment", "title", "description", "default", "examples",
     "definitions", "errorMessage", "markdownDescription"}
)  # fmt: skip
#: Keywords checked against the value itself; the others descend into it.
_LOCAL = frozenset(
    {"type", "enum", "const", "pattern", "minLength", "maxLength", "minimum",
     "exclusiveMinimum", "minItems", "maxProperties", "not", "anyOf", "oneOf"}
)  # fmt: skip
_STRUCTURAL = frozenset(
    {
        "$ref",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "allOf",
        "if",
        "then",
        "else",
    }
)
_TYPE_WORDS = {
    "object": "a mapping",
    "array": "a list",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "null": "null",
}


@attrs.frozen
class Problem:
    path: Path
    message: str


def where(path: Path) -> str:
    """``consumers[0].allow[1].methods``: the form users read in messages."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def line(file: str, path: Path, message: str) -> str:
    """One problem as users read it: ``ROUTES_FILE: routes[2].prefix: ...``."""
    return f"{file}: {where(path)}: {message}" if path else f"{file}: {message}"


def _is_type(value: Any, name: str) -> bool:
    if name == "object":
        return isinstance(value, Mapping)
    if name == "array":
        return isinstance(value, list)
    if name == "string":
        return isinstance(value, str)
    if name == "boolean":
        return isinstance(value, bool)
    if name == "null":
        return value is None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    # YAML has .inf and .nan; JSON numbers are finite.
    if not math.isfinite(value):
        return False
    return name == "number" or float(value).is_integer()


def _types(node: Mapping[str, Any]) -> list[str]:
    types = node.get("type", [])
    return [types] if isinstance(types, str) else list(types)


def _python_pattern(pattern: str) -> re.Pattern[str]:
    # ECMA-262's final `$` is the end of the input; Python's `$` also
    # matches before a final newline, which would let "name\n" through.
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    return re.compile(pattern)


@attrs.frozen
class Schema:
    """A loaded schema file; `problems` lists what a document breaks."""

    root: Mapping[str, Any]
    patterns: Mapping[str, re.Pattern[str]]

    @classmethod
    def from_json(cls, text: str) -> Schema:
        root = json.loads(text)
        patterns: dict[str, re.Pattern[str]] = {}

        def walk(node: Any, at: str) -> None:
            if isinstance(node, bool):
                return
            if not isinstance(node, dict):
                raise ValueError(f"{at}: a schema must be an object or a boolean")
            unknown = set(node) - _ANNOTATIONS - _LOCAL - _STRUCTURAL
            if unknown:
                raise ValueError(f"{at}: keywords outside the supported subset: {sorted(unknown)}")
            if "$ref" in node and set(node) - _ANNOTATIONS - {"$ref"}:
                raise ValueError(f"{at}: draft-07 ignores keywords beside $ref")
            if "$ref" in node:
                cls._resolve(root, node["$ref"])
            if not isinstance(node.get("additionalProperties", False), bool):
                raise ValueError(f"{at}: additionalProperties must be true or false here")
            if "pattern" in node:
                patterns[node["pattern"]] = _python_pattern(node["pattern"])
            for name in _types(node):
                if name not in _TYPE_WORDS:
                    raise ValueError(f"{at}: unknown type {name!r}")
            for key in ("not", "items", "if", "then", "else"):
                if key in node:
                    walk(node[key], f"{at}/{key}")
            for key in ("properties", "definitions"):
                for name, sub in node.get(key, {}).items():
                    walk(sub, f"{at}/{key}/{name}")
            for key in ("anyOf", "oneOf", "allOf"):
                for i, sub in enumerate(node.get(key, [])):
                    walk(sub, f"{at}/{key}/{i}")

        walk(root, "#")
        return cls(root, patterns)

    @staticmethod
    def _resolve(root: Mapping[str, Any], ref: str) -> Any:
        if not ref.startswith("#/"):
            raise ValueError(f"$ref {ref!r}: only references inside the file")
        node: Any = root
        for part in ref[2:].split("/"):
            node = node[part]
        return node

    def _node(self, node: Any) -> Any:
        while isinstance(node, dict) and "$ref" in node:
            node = self._resolve(self.root, node["$ref"])
        return node

    def problems(self, value: Any) -> list[Problem]:
        out: list[Problem] = []
        self._check(self.root, value, (), out)
        return out

    def valid(self, node: Any, value: Any) -> bool:
        out: list[Problem] = []
        self._check(node, value, (), out)
        return not out

    def _accepts_type(self, node: Any, value: Any) -> bool:
        node = self._node(node)
        return isinstance(node, dict) and any(_is_type(value, t) for t in _types(node))

    def _check(self, node: Any, value: Any, path: Path, out: list[Problem]) -> None:
        node = self._node(node)
        if node is True:
            return
        if node is False:
            out.append(Problem(path, "not allowed here"))
            return
        fails = self._local(node, value, path, out)
        if fails is None:  # a branch of anyOf/oneOf said it more precisely
            return
        if fails:
            message = node.get("errorMessage")
            out.extend(Problem(path, m) for m in ([message] if message else fails))
            return
        self._descend(node, value, path, out)

    def _local(self, node: Any, value: Any, path: Path, out: list[Problem]) -> list[str] | None:
        """Failures of the node's own keywords, or None when one anyOf/oneOf
        branch (the only one of the value's type) reported deeper problems."""
        if "type" in node and not any(_is_type(value, t) for t in _types(node)):
            return ["must be " + " or ".join(_TYPE_WORDS[t] for t in _types(node))]
        fails = []
        if "enum" in node and value not in node["enum"]:
            fails.append("must be one of " + ", ".join(map(str, node["enum"])))
        if "const" in node and value != node["const"]:
            fails.append(f"must be {node['const']}")
        if isinstance(value, str):
            if "pattern" in node and not self.patterns[node["pattern"]].search(value):
                fails.append("is not in the expected form")
            if len(value) < node.get("minLength", 0):
                fails.append(f"must be at least {node['minLength']} characters")
            if len(value) > node.get("maxLength", math.inf):
                fails.append(f"must be at most {node['maxLength']} characters")
        if _is_type(value, "number"):
            if value < node.get("minimum", -math.inf):
                fails.append(f"must be at least {node['minimum']}")
            if value <= node.get("exclusiveMinimum", -math.inf):
                fails.append(f"must be more than {node['exclusiveMinimum']}")
        if isinstance(value, list) and len(value) < node.get("minItems", 0):
            fails.append(f"must have at least {node['minItems']} item(s)")
        if isinstance(value, Mapping) and len(value) > node.get("maxProperties", math.inf):
            fails.append(f"must have at most {node['maxProperties']} key(s)")
        if "not" in node and self.valid(node["not"], value):
            fails.append("is not allowed")
        for key in ("anyOf", "oneOf"):
            if key not in node:
                continue
            branches = node[key]
            results = []
            for branch in branches:
                found: list[Problem] = []
                self._check(branch, value, path, found)
                results.append(found)
            passed = sum(not r for r in results)
            if passed == 1 or (passed > 1 and key == "anyOf"):
                continue
            typed = [
                r for b, r in zip(branches, results, strict=True) if self._accepts_type(b, value)
            ]
            if passed == 0 and len(typed) == 1 and all(p.path != path for p in typed[0]):
                out.extend(typed[0])
                return None
            fails.append("matches none of the allowed forms" if passed == 0 else "is ambiguous")
        return fails

    def _descend(self, node: Any, value: Any, path: Path, out: list[Problem]) -> None:
        # The value as a whole first (missing and unknown keys, allOf, if),
        # then its parts: a file's problems read from the outside in.
        properties = node.get("properties", {})
        if isinstance(value, Mapping):
            for key in node.get("required", []):
                if key not in value:
                    message = self._node(properties.get(key, {}))
                    message = message.get("errorMessage") if isinstance(message, dict) else None
                    out.append(Problem((*path, key), message or "is required"))
            if node.get("additionalProperties", True) is False:
                unknown = sorted(str(k) for k in value if k not in properties)
                if unknown:
                    out.append(Problem(path, f"unknown keys {', '.join(unknown)}"))
        for sub in node.get("allOf", []):
            self._check(sub, value, path, out)
        if "if" in node:
            branch = node.get("then" if self.valid(node["if"], value) else "else", True)
            self._check(branch, value, path, out)
        if isinstance(value, Mapping):
            for key, sub in properties.items():
                if key in value:
                    self._check(sub, value[key], (*path, key), out)
        if isinstance(value, list) and "items" in node:
            for i, item in enumerate(value):
                self._check(node["items"], item, (*path, i), out)


@functools.cache
def load(name: str) -> Schema:
    """The shipped schema ``name`` (``client-auth``, ``routes``), read once."""
    text = resources.files("lgmt_proxy.config").joinpath(f"schemas/{name}.schema.json").read_text()
    return Schema.from_json(text)
