"""The user file formats as JSON Schema (``lgmt_proxy/config/schemas/*.schema.json``),
validated by ``jsonschema`` and told to users in our own words.

The schema files are the single source: the code validates with them, the
docs link to them, editors load them. ``jsonschema``'s `Draft7Validator`
finds every error with its path (`iter_errors`); this module turns each into
one line at that path, worded by the schema's own ``errorMessage`` (the
keyword VS Code's JSON and YAML servers show too) or by our wording of the
keyword, never the offending value (it may be a token). A keyword we have no
wording for makes loading fail, so a schema cannot make the proxy echo a
value. Two departures from stock draft-07, both to read files as editors do:
a pattern's final ``$`` is ECMA-262's (the end of the input, not before a
final newline), and a number must be finite (YAML has ``.inf``).
"""

from __future__ import annotations

import functools
import json
import math
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from importlib import resources
from typing import Any

import attrs
import jsonschema
import yaml
from jsonschema import Draft7Validator
from jsonschema.exceptions import ValidationError

Path = tuple[str | int, ...]

#: Keywords that only annotate: editors show them, validation skips them.
_ANNOTATIONS = frozenset(
    {"$schema", "$id", "$comment", "title", "description", "default", "examples",
     "definitions", "errorMessage", "markdownDescription"}
)  # fmt: skip
#: Keywords we word (or that only descend into the value): the schemas may use these.
_WORDED = frozenset(
    {"type", "enum", "const", "pattern", "minLength", "maxLength", "minimum",
     "exclusiveMinimum", "minItems", "maxProperties", "not", "anyOf", "oneOf",
     "$ref", "properties", "required", "additionalProperties", "items", "allOf",
     "if", "then", "else"}
)  # fmt: skip
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


def in_document_order(doc: Any, found: Iterable[tuple[Path, str]]) -> list[tuple[Path, str]]:
    """``(path, message)`` pairs in the order of the file, top to bottom: a
    value's own problems, then a key it lacks, then its parts as written.
    Problems at one path keep their order (stable sort)."""

    def key(path: Path) -> tuple[int, ...]:
        out = []
        node = doc
        for part in path:
            if isinstance(node, Mapping):
                keys = list(node)
                out.append(keys.index(part) if part in node else -1)
            elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
                out.append(part)
            else:
                out.append(-1)
                node = None
                continue
            node = node[part] if out[-1] >= 0 else None
        return tuple(out)

    return sorted(found, key=lambda p: key(p[0]))


def read_document(data: bytes, *, toml: bool = False) -> tuple[Any, str | None]:
    """The document a file holds (YAML, which reads JSON too, or TOML), or
    the parser's own reason where it stopped: ``line 4, column 7: not valid
    YAML or JSON: mapping values are not allowed here``."""
    kind = "TOML" if toml else "YAML or JSON"
    try:
        if toml:
            return tomllib.loads(data.decode("utf-8")), None
        return yaml.safe_load(data), None
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 text (byte {e.start + 1})"
    except tomllib.TOMLDecodeError as e:
        found = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", str(e), re.S)
        if found is None:
            return None, f"not valid {kind}: {e}"
        reason, row, column = found.groups()
        return None, f"line {row}, column {column}: not valid {kind}: {reason}"
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        reason = e.problem or e.context or "cannot be parsed"
        if e.problem and e.context:
            reason += f" ({e.context})"
        return None, f"{at}not valid {kind}: {reason}"
    except yaml.YAMLError as e:
        return None, f"not valid {kind}: {str(e).splitlines()[0]}"


def _python_pattern(pattern: str) -> re.Pattern[str]:
    # ECMA-262's final `$` is the end of the input; Python's `$` also
    # matches before a final newline, which would let "name\n" through.
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    return re.compile(pattern)


_compiled = functools.lru_cache(maxsize=None)(_python_pattern)


def _pattern(validator: Any, pattern: str, instance: Any, node: Any) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _compiled(pattern).search(instance):
        yield ValidationError("does not match")


def _finite(kind: str) -> Any:
    stock = Draft7Validator.TYPE_CHECKER

    def check(checker: Any, instance: Any) -> bool:
        return bool(stock.is_type(instance, kind) and math.isfinite(instance))

    return check


_Validator = jsonschema.validators.extend(
    Draft7Validator,
    validators={"pattern": _pattern},
    type_checker=Draft7Validator.TYPE_CHECKER.redefine_many(
        {"number": _finite("number"), "integer": _finite("integer")}
    ),
)


def _wording(error: ValidationError) -> str:
    """Our words for a failed keyword of a node without an ``errorMessage``."""
    kw, value = error.validator, error.validator_value
    if kw == "type":
        return "must be " + " or ".join(
            _TYPE_WORDS[t] for t in ([value] if isinstance(value, str) else value)
        )
    words = {
        "enum": lambda: "must be one of " + ", ".join(map(str, value)),
        "const": lambda: f"must be {value}",
        "pattern": lambda: "is not in the expected form",
        "minLength": lambda: f"must be at least {value} characters",
        "maxLength": lambda: f"must be at most {value} characters",
        "minimum": lambda: f"must be at least {value}",
        "exclusiveMinimum": lambda: f"must be more than {value}",
        "minItems": lambda: f"must have at least {value} item(s)",
        "maxProperties": lambda: f"must have at most {value} key(s)",
        "not": lambda: "is not allowed",
        "anyOf": lambda: "matches none of the allowed forms",
        "oneOf": lambda: (
            "is ambiguous" if not error.context else "matches none of the allowed forms"
        ),
        "false": lambda: "not allowed here",
    }
    return words.get(str(kw), lambda: "not allowed here")()


@attrs.frozen
class Schema:
    """A loaded schema file; `problems` lists what a document breaks."""

    root: Mapping[str, Any]
    validator: Any

    @classmethod
    def from_json(cls, text: str) -> Schema:
        root = json.loads(text)
        try:
            _Validator.check_schema(root)
        except jsonschema.SchemaError as e:
            raise ValueError(f"not a draft-07 schema: {e.message}") from None

        def walk(node: Any, at: str) -> None:
            if isinstance(node, bool):
                return
            if not isinstance(node, dict):
                raise ValueError(f"{at}: a schema must be an object or a boolean")
            unknown = set(node) - _ANNOTATIONS - _WORDED
            if unknown:
                raise ValueError(f"{at}: keywords without our wording: {sorted(unknown)}")
            if "$ref" in node and set(node) - _ANNOTATIONS - {"$ref"}:
                raise ValueError(f"{at}: draft-07 ignores keywords beside $ref")
            if "$ref" in node:
                _resolve(root, node["$ref"])
            if not isinstance(node.get("additionalProperties", False), bool):
                raise ValueError(f"{at}: additionalProperties must be true or false here")
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
        return cls(root, _Validator(root))

    def problems(self, value: Any) -> list[Problem]:
        """Every problem of a document, one per path and wording, in the
        document's order."""
        found = list(dict.fromkeys(self._explain(list(self.validator.iter_errors(value)))))
        return [Problem(p, m) for p, m in in_document_order(value, found)]

    def _node(self, node: Any) -> Any:
        while isinstance(node, dict) and "$ref" in node:
            node = _resolve(self.root, node["$ref"])
        return node

    def _explain(self, errors: Sequence[ValidationError]) -> Iterator[tuple[Path, str]]:
        # A value of the wrong type: that is all there is to say about it.
        wrong = {tuple(e.absolute_path) for e in errors if e.validator == "type"}
        for error in errors:
            path: Path = tuple(error.absolute_path)
            if any(path[:n] in wrong for n in range(len(path))) or (
                path in wrong and error.validator != "type"
            ):
                continue
            yield from self._explain_one(error, path)

    def _explain_one(self, error: ValidationError, path: Path) -> Iterator[tuple[Path, str]]:
        node = error.schema if isinstance(error.schema, Mapping) else {}
        kw = error.validator
        if kw == "required":
            properties = node.get("properties", {})
            for key in error.validator_value:
                if isinstance(error.instance, Mapping) and key not in error.instance:
                    sub = self._node(properties.get(key, {}))
                    message = sub.get("errorMessage") if isinstance(sub, Mapping) else None
                    yield (*path, key), message or "is required"
            return
        if kw == "additionalProperties":
            known = node.get("properties", {})
            unknown = sorted(str(k) for k in error.instance if k not in known)
            yield path, f"unknown keys {', '.join(unknown)}"
            return
        if kw in ("anyOf", "oneOf") and error.context:
            deeper = self._only_branch(error)
            if deeper is not None:
                yield from self._explain(deeper)
                return
        message = node.get("errorMessage")
        yield path, message if isinstance(message, str) else _wording(error)

    def _only_branch(self, error: ValidationError) -> list[ValidationError] | None:
        """The errors of the one branch that takes the value's type, when they
        are all inside the value: then they say it more precisely than the
        choice's own message (``tenant[1]: ...`` rather than "a tenant id or
        a list of them")."""
        by_branch: dict[int, list[ValidationError]] = {}
        for sub in error.context or ():
            by_branch.setdefault(int(sub.schema_path[0]), []).append(sub)
        typed = [
            i
            for i, branch in enumerate(error.validator_value)
            if "type" in self._node(branch)
            and not any(e.validator == "type" and not e.relative_path for e in by_branch.get(i, []))
        ]
        if len(typed) != 1:
            return None
        found = by_branch.get(typed[0], [])
        if not found or any(not e.relative_path for e in found):
            return None
        return found


def _resolve(root: Mapping[str, Any], ref: str) -> Any:
    if not ref.startswith("#/"):
        raise ValueError(f"$ref {ref!r}: only references inside the file")
    node: Any = root
    for part in ref[2:].split("/"):
        node = node[part]
    return node


@functools.cache
def load(name: str) -> Schema:
    """The shipped schema ``name`` (``client-auth``, ``routes``), read once."""
    text = resources.files("lgmt_proxy.config").joinpath(f"schemas/{name}.schema.json").read_text()
    return Schema.from_json(text)
