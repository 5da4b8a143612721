"""Which build of lgmt_proxy is imported: the pure package, or the one whose
data plane mypyc compiled (setup.py's ``COMPILED``, built with
``LGMT_PROXY_MYPYC=1``).

``python -m tests.support.build`` (run by `make venv-compiled`, with
``LGMT_PROXY_MYPYC=1``) exits 1, naming them, when a module is not the kind
expected: an extension module for every name in ``COMPILED``, Python source
for every other; tests/pure/test_build.py asserts the same in both CI runs.
"""

from __future__ import annotations

import ast
import importlib
import os
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "lgmt_proxy"
#: Extension modules' file suffixes (``.cpython-311-x86_64-linux-gnu.so``...).
EXTENSION_SUFFIXES = (".so", ".pyd")


def compiled_modules(setup_py: Path = ROOT / "setup.py") -> list[str]:
    """The dotted names of the modules setup.py's ``COMPILED`` lists."""
    for node in ast.parse(setup_py.read_text()).body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "COMPILED" for t in node.targets)
            and isinstance(node.value, ast.List)
        ):
            paths = [ast.literal_eval(item) for item in node.value.elts]
            return [p.removesuffix(".py").replace("/", ".") for p in paths]
    raise LookupError(f"no COMPILED list in {setup_py}")


def package_modules() -> list[str]:
    """Every module of the source tree's package by dotted name (no ``__init__``)."""
    return sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for path in PACKAGE.rglob("*.py")
        if path.name != "__init__.py"
    )


def expect_compiled() -> bool:
    """Whether this run is of the compiled build (``LGMT_PROXY_MYPYC=1``)."""
    return os.environ.get("LGMT_PROXY_MYPYC", "") == "1"


def wrong_kind(files: Mapping[str, str], compiled: set[str], expect: bool) -> list[str]:
    """The modules of ``files`` (name -> file imported) not of the kind
    expected, each with what it is: compiled ones when ``expect``, sources
    for all the others."""
    found = []
    for name, file in sorted(files.items()):
        is_extension = file.endswith(EXTENSION_SUFFIXES)
        if is_extension != (expect and name in compiled):
            found.append(f"{name}: {file}")
    return found


def imported_files() -> dict[str, str]:
    """Each package module imported, by name, with the file it came from."""
    return {name: str(importlib.import_module(name).__file__) for name in package_modules()}


def main() -> int:
    expect = expect_compiled()
    wrong = wrong_kind(imported_files(), set(compiled_modules()), expect)
    build = "compiled (mypyc)" if expect else "pure Python"
    if wrong:
        print(f"lgmt_proxy: expected the {build} build; not so:", *wrong, sep="\n  ")
        return 1
    print(f"lgmt_proxy: the {build} build, {len(compiled_modules())} modules compiled by setup.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
