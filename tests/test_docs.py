"""The documentation and the installed entry point agree with the code.

- Every row of the "Code anchors" table in docs/architecture.md names a file
  that exists and symbols defined in it (the maintenance rule: anchors change
  in the same commit as the code).
- Every variable config.py reads is described in docs/configuration.md.
- ``twistd lgmt-proxy`` is installed next to this interpreter, and a bad
  environment makes it exit non-zero with one line per problem, no traceback
  and never the token.
"""

from __future__ import annotations

import ast
import os
import re
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURE = ROOT / "docs" / "architecture.md"
CONFIGURATION = ROOT / "docs" / "configuration.md"
TWISTD = Path(sys.executable).parent / "twistd"

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
    tree = ast.parse((ROOT / "lgmt_proxy" / "config.py").read_text())
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


class _Collect(ProcessProtocol):
    """Collects a child's output; kills it if it outlives ``timeout``."""

    def __init__(self, timeout: float) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self.timed_out = False
        self.ended: Deferred[int | None] = Deferred()
        self._timeout = timeout
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self.transport.closeStdin()  # type: ignore[union-attr]
        self._timer = reactor.callLater(self._timeout, self._kill)  # type: ignore[attr-defined]

    def _kill(self) -> None:
        self._timer = None
        self.timed_out = True
        self.transport.signalProcess("KILL")  # type: ignore[union-attr]

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self.ended.callback(getattr(reason.value, "exitCode", None))


async def run_twistd(
    args: list[str], env: dict[str, str], timeout: float
) -> tuple[str, int | None, bool]:
    """Run the installed twistd; return (stdout + stderr, exit code, timed out).

    Not `getProcessOutputAndValue`: its Deferred cannot be cancelled, so a
    child that hangs would outlive the test. This kills it at ``timeout``.
    """
    protocol = _Collect(timeout)
    child_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}
    reactor.spawnProcess(  # type: ignore[attr-defined]
        protocol, str(TWISTD), [str(TWISTD), *args], env=child_env, path=str(ROOT)
    )
    code = await protocol.ended
    output = (protocol.out + protocol.err).decode("utf-8", "replace")
    return output, code, protocol.timed_out


class TwistdTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        if not TWISTD.exists():
            self.fail(f"{TWISTD} is missing: install the project (make venv)")

    def _twistd(self, args: list[str], env: dict[str, str], limit: float) -> Deferred[Any]:
        return Deferred.fromCoroutine(run_twistd(args, env, limit))

    async def test_help(self) -> None:
        output, code, timed_out = await self._twistd(["lgmt-proxy", "--help"], {}, 20)
        self.assertFalse(timed_out)
        self.assertEqual(code, 0, output)
        self.assertIn("--sandbox", output)
        self.assertIn("--listen", output)
        self.assertIn("--admin-listen", output)

    async def test_bad_environment(self) -> None:
        env = {
            "PORT": "0",
            "GRAFANA_CLOUD_LOKI_URL": "http://example.com",
            "GRAFANA_CLOUD_ACCESS_TOKEN": "supersecret-value",
        }
        output, code, timed_out = await self._twistd(["-n", "--pidfile=", "lgmt-proxy"], env, 20)
        self.assertFalse(timed_out, f"twistd still running after 20 s:\n{output}")
        self.assertNotIn(code, (0, None), output)
        self.assertNotIn("Traceback", output)
        self.assertNotIn("supersecret-value", output)
        lines = output.splitlines()
        about: dict[str, list[str]] = {}
        for name in ("PORT", "GRAFANA_CLOUD_LOKI_URL", "GRAFANA_CLOUD_LOKI_ORG_ID"):
            pattern = re.compile(rf"(?<![A-Za-z0-9_]){name}: \S")
            about[name] = [line for line in lines if pattern.search(line)]
            self.assertEqual(len(about[name]), 1, f"one line about {name}:\n{output}")
        # A separate line per problem, not one line naming them all.
        self.assertEqual(len({found[0] for found in about.values()}), len(about), output)
