"""The documentation and the installed entry point agree with the code.

- Every row of the "Code anchors" table in docs/architecture.md names a file
  that exists and symbols defined in it (the maintenance rule: anchors change
  in the same commit as the code).
- Every variable config.py reads is described in docs/configuration.md, and
  the defaults there and in the README's table are the code's.

The installed ``twistd lgmt-proxy`` is checked in tests/process/test_twistd.py.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from twisted.trial.unittest import TestCase

ROOT = Path(__file__).resolve().parents[2]
ARCHITECTURE = ROOT / "docs" / "architecture.md"
CONFIGURATION = ROOT / "docs" / "configuration.md"

_BACKTICKED = re.compile(r"`([^`]+)`")
_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?")


def defined_symbols(source: str) -> set[str]:
    """Names a module defines at top level (functions, classes, assigned
    names) and ``Class.method`` for the functions in each class body."""
    found: set[str] = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            found.add(node.name)
        elif isinstance(node, ast.ClassDef):
            found.add(node.name)
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    found.add(f"{node.name}.{item.name}")
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    found.add(target.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            found.add(node.target.id)
    return found


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def anchor_rows(markdown: str) -> list[tuple[str, str, list[str]]]:
    """``(component, file, symbols)`` for each row of the table that follows
    the "Code anchors" heading."""
    lines = markdown.splitlines()
    start = next(
        i for i, line in enumerate(lines) if re.match(r"#+\s+Code anchors\s*$", line, re.I)
    )
    table: list[str] = []
    for line in lines[start + 1 :]:
        if line.lstrip().startswith("|"):
            table.append(line)
        elif table or line.startswith("#"):
            break
    header = [cell.lower() for cell in _cells(table[0])]
    component, file, symbols = (header.index(n) for n in ("component", "file", "symbols"))
    rows = []
    for line in table[2:]:  # after the header and the |---| line
        cells = _cells(line)
        paths = _BACKTICKED.findall(cells[file])
        if len(paths) != 1:
            raise AssertionError(f"File cell must hold one `path`: {line!r}")
        names = [name.rstrip("()") for name in _BACKTICKED.findall(cells[symbols])]
        rows.append((cells[component], paths[0], names))
    return rows


def config_variables() -> set[str]:
    """The literal variable names config.py reads: the first argument of
    ``env.get(...)`` and of the reader's get/number/integer/boolean/choice."""
    tree = ast.parse((ROOT / "lgmt_proxy" / "config" / "settings.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in {"get", "number", "integer", "boolean", "choice"}
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and re.fullmatch(r"[A-Z][A-Z0-9_]+", node.args[0].value)
        ):
            names.add(node.args[0].value)
    return names


class CodeAnchorTests(TestCase):
    def test_symbol_finder(self) -> None:
        source = (
            "X = 1\n"
            "y: int = 2\n"
            "def f(): pass\n"
            "async def g(): pass\n"
            "class C:\n"
            "    attr = 3\n"
            "    def m(self): pass\n"
            "    async def n(self): pass\n"
            "    class Inner:\n"
            "        def deep(self): pass\n"
            "if True:\n"
            "    def hidden(): pass\n"
        )
        self.assertEqual(defined_symbols(source), {"X", "y", "f", "g", "C", "C.m", "C.n"})

    def test_table_parser(self) -> None:
        markdown = (
            "# Doc\n\n## Code anchors\n\nSome words.\n\n"
            "| Component | File | Symbols |\n"
            "| --- | --- | --- |\n"
            "| A | `a.py` | `f`, `C.m()` |\n"
            "| B | `b/c.py` | `D` |\n"
            "\n| Other | table |\n"
        )
        self.assertEqual(
            anchor_rows(markdown), [("A", "a.py", ["f", "C.m"]), ("B", "b/c.py", ["D"])]
        )

    def test_anchors_exist(self) -> None:
        rows = anchor_rows(ARCHITECTURE.read_text())
        self.assertGreater(len(rows), 5)
        problems = []
        for component, file, symbols in rows:
            path = ROOT / file
            if not path.is_file():
                problems.append(f"{component}: {file} does not exist")
                continue
            if not symbols:
                problems.append(f"{component}: no symbols listed for {file}")
            defined = defined_symbols(path.read_text())
            for name in symbols:
                if not _SYMBOL.fullmatch(name):
                    problems.append(f"{component}: {name!r} is not a symbol or Class.method")
                elif name not in defined:
                    problems.append(f"{component}: {name} is not defined in {file}")
        self.assertEqual(problems, [])


class ConfigurationDocTests(TestCase):
    def test_every_variable_documented(self) -> None:
        names = config_variables()
        self.assertIn("PORT", names)
        self.assertIn("GRAFANA_CLOUD_ACCESS_TOKEN", names)
        text = CONFIGURATION.read_text()
        missing = sorted(n for n in names if f"`{n}`" not in text)
        self.assertEqual(missing, [])
        for signal_variable in ("URL", "ORG_ID", "TENANT_ID"):
            self.assertIn(f"`GRAFANA_CLOUD_<SIGNAL>_{signal_variable}`", text)
        for option in ("--listen", "--admin-listen", "--sandbox"):
            self.assertIn(f"`{option}", text)


def code_defaults() -> dict[str, object]:
    """What settings.py's reader falls back to, by variable: the second
    argument of ``number``/``integer``/``boolean``/``choice``."""
    tree = ast.parse((ROOT / "lgmt_proxy" / "config" / "settings.py").read_text())
    found: dict[str, object] = {}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in {"number", "integer", "boolean", "choice"}
            and len(node.args) >= 2
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[1], ast.Constant)
        ):
            found[node.args[0].value] = node.args[1].value
    return found


def documented_defaults(markdown: str) -> dict[str, str]:
    """``variable -> default`` from the rows of a variable table whose first
    cell names variables (`A` / `B` rows give one default each)."""
    found = {}
    for line in markdown.splitlines():
        if not line.startswith("| `"):
            continue
        cells = _cells(line)
        if len(cells) < 3:
            continue
        names = [n for n in _BACKTICKED.findall(cells[0]) if re.fullmatch(r"[A-Z][A-Z0-9_]+", n)]
        values = [v.strip() for v in cells[1].split(" / ")]
        if len(names) != len(values):
            continue
        for name, value in zip(names, values, strict=True):
            ticked = _BACKTICKED.match(value)
            found[name] = ticked.group(1) if ticked else value.split(" ")[0] if value else ""
    return found


def same_default(text: str, value: object) -> bool:
    if isinstance(value, bool):
        return text.lower() == str(value).lower()
    if isinstance(value, int | float):
        try:
            return float(text) == float(value)
        except ValueError:
            return False
    return text == value


class DefaultsDocTests(TestCase):
    """The README's table and configuration.md give the defaults the code has
    (the README once said 30 for UPSTREAM_TIMEOUT_SECONDS; the code has 300)."""

    def test_defaults_match_the_code(self) -> None:
        code = code_defaults()
        self.assertEqual(code["UPSTREAM_TIMEOUT_SECONDS"], 300.0)
        for doc in (ROOT / "README.md", CONFIGURATION):
            documented = documented_defaults(doc.read_text())
            checked = {n: d for n, d in documented.items() if n in code and d}
            self.assertGreaterEqual(len(checked), 12, (doc.name, checked))
            wrong = {n: (d, code[n]) for n, d in checked.items() if not same_default(d, code[n])}
            self.assertEqual(wrong, {}, doc.name)
