"""The package's layout keeps its architecture (issue 18):

- no module in lgmt_proxy/ over 500 lines, no class over 300;
- no import cycle among lgmt_proxy's modules, imports under
  ``TYPE_CHECKING`` included;
- every write to a connection and every pause or resume of its reading goes
  through its write owner (`io/sending.py`) and its read gate
  (`io/reading.py`): a ``.transport.write(...)``, ``pauseProducing()`` or
  ``resumeProducing()`` call anywhere else fails.

Each rule's finder is tested on a small example first, so a finder that
found nothing could not pass for a clean tree.
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial.unittest import TestCase

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "lgmt_proxy"
MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 300
#: The only modules that may write to a transport or pause and resume one.
IO_OWNERS = frozenset(
    {"lgmt_proxy.io.sending", "lgmt_proxy.io.reading", "lgmt_proxy.io.tls", "lgmt_proxy.io.tlswire"}
)
#: Writes allowed before a connection has an owner, each with why it cannot
#: reorder anything: (module, what) -> reason.
BEFORE_THE_OWNER = {
    ("lgmt_proxy.dataplane.forward", "transport.write"): (
        "the CONNECT request to a forward proxy: the tunnel's one write, made before "
        "the protocol that installs the connection's Sender exists"
    ),
}
_PAUSES = frozenset({"pauseProducing", "resumeProducing"})


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imported(name: str, source: str, known: set[str]) -> set[str]:
    """The known modules ``name``'s source imports, wherever the import
    statement is (``if TYPE_CHECKING:`` and functions included)."""
    package = name if name in known and _is_package(name, known) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base in known:
                found.add(base)
            for alias in node.names:
                if f"{base}.{alias.name}" in known:
                    found.add(f"{base}.{alias.name}")
    found.discard(name)
    return found


def _is_package(name: str, known: set[str]) -> bool:
    return any(other.startswith(name + ".") for other in known)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle found by a depth-first walk, as a list of names
    that starts and ends with the same module."""
    found: list[list[str]] = []
    done: set[str] = set()
    stack: list[str] = []

    def visit(node: str) -> None:
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in stack:
                found.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in done:
                visit(nxt)
        stack.pop()
        done.add(node)

    for node in sorted(graph):
        if node not in done:
            visit(node)
    return found


def io_calls(source: str) -> list[tuple[int, str]]:
    """``(line, what)`` for each ``<x>.transport.write(...)``, and each
    ``pauseProducing()`` or ``resumeProducing()`` call, in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        attr = node.func.attr
        target = node.func.value
        if attr in _PAUSES:
            found.append((node.lineno, attr))
        elif attr in ("write", "writeSequence") and (
            (isinstance(target, ast.Attribute) and target.attr == "transport")
            or (isinstance(target, ast.Name) and target.id == "transport")
        ):
            found.append((node.lineno, f"transport.{attr}"))
    return found


def oversized(source: str) -> list[tuple[str, int]]:
    """``(class, lines)`` for each class over the limit, nested ones too."""
    return [
        (node.name, node.end_lineno - node.lineno + 1)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ClassDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES
    ]


class FinderTests(TestCase):
    """The finders find what they look for."""

    def test_imports_seen_everywhere(self) -> None:
        known = {"p", "p.a", "p.b", "p.c", "p.d", "p.e"}
        source = (
            "from typing import TYPE_CHECKING\n"
            "import p.b\n"
            "from p import c\n"
            "from .d import x\n"
            "if TYPE_CHECKING:\n"
            "    from p.e import Y\n"
            "def f():\n"
            "    import os\n"
        )
        self.assertEqual(imported("p.a", source, known), {"p", "p.b", "p.c", "p.d", "p.e"})

    def test_cycles(self) -> None:
        self.assertEqual(cycles({"a": {"b"}, "b": {"c"}, "c": set()}), [])
        self.assertEqual(cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}), [["a", "b", "c", "a"]])

    def test_io_calls(self) -> None:
        source = (
            "self.transport.write(b'x')\n"
            "transport.writeSequence([])\n"
            "self.out.write(b'x')\n"
            "producer.pauseProducing()\n"
            "self.transport.resumeProducing()\n"
            "self.reading.hold(1)\n"
        )
        self.assertEqual(
            io_calls(source),
            [
                (1, "transport.write"),
                (2, "transport.writeSequence"),
                (4, "pauseProducing"),
                (5, "resumeProducing"),
            ],
        )

    def test_oversized(self) -> None:
        body = "".join(f"    x{i} = {i}\n" for i in range(MAX_CLASS_LINES))
        self.assertEqual(oversized(f"class Small:\n    pass\nclass Big:\n{body}"), [("Big", 301)])


class LayoutTests(TestCase):
    def test_sizes(self) -> None:
        problems = []
        for name, path in modules().items():
            source = path.read_text()
            lines = len(source.splitlines())
            if lines > MAX_MODULE_LINES:
                problems.append(f"{name}: {lines} lines (at most {MAX_MODULE_LINES})")
            for cls, size in oversized(source):
                problems.append(f"{name}.{cls}: {size} lines (at most {MAX_CLASS_LINES})")
        self.assertEqual(problems, [])

    def test_no_import_cycle(self) -> None:
        found = modules()
        known = set(found)
        graph = {name: imported(name, path.read_text(), known) for name, path in found.items()}
        self.assertIn("lgmt_proxy.dataplane.exchange", graph["lgmt_proxy.dataplane.dispatcher"])
        self.assertEqual([" -> ".join(cycle) for cycle in cycles(graph)], [])

    def test_transports_written_and_paused_by_their_owners_only(self) -> None:
        problems = []
        for name, path in modules().items():
            if name in IO_OWNERS:
                continue
            for line, what in io_calls(path.read_text()):
                if (name, what) not in BEFORE_THE_OWNER:
                    problems.append(f"{name}:{line}: {what}")
        self.assertEqual(problems, [])
