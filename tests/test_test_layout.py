"""The layout of the test suite: a test module imports helpers from tests.support, never another test module.

Importing a test module from another collects its tests twice, runs its module-level setup in a place
nobody looks for it, and makes its fixtures appear by import (flagged unused, then silenced). Fixtures
come through pytest from tests/conftest.py, so no test module imports conftest either.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def imported_modules(source: str, package: str = "tests") -> list[str]:
    """Every module an `import` or `from ... import` statement of `source` names, relative imports resolved
    against `package` (the package of a module in tests/), and the modules a `from PACKAGE import NAME` may
    name (PACKAGE.NAME)."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parent, base] if base else parent)
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]
    return names


def forbidden(modules: list[str]) -> list[str]:
    """The test modules (tests.test_*) and the conftest among `modules`: what no test module may import."""
    found = set()
    for module in modules:
        package, _, rest = module.partition(".")
        name = rest.split(".")[0]
        if package == "tests" and (name.startswith("test_") or name == "conftest"):
            found.add(f"tests.{name}")
    return sorted(found)


def offences(path: Path) -> list[str]:
    return forbidden(imported_modules(path.read_text()))


# {t} stands for "test_", so that grepping the suite for imports of test modules finds none here
@pytest.mark.parametrize(("source", "found"), [
    ("from tests.{t}truth import within", ["tests.{t}truth"]),
    ("import tests.{t}distributed as distributed", ["tests.{t}distributed"]),
    ("from tests import {t}cli", ["tests.{t}cli"]),
    ("from .{t}perf_analyzer import perf_analyzer", ["tests.{t}perf_analyzer"]),
    ("from . import conftest", ["tests.conftest"]),
    ("from tests.conftest import ROOT", ["tests.conftest"]),
    ("from tests.support.timing import within\nimport tests.support.processes", []),
    ("def f():\n    from tests.{t}x import y", ["tests.{t}x"]),
])
def test_the_check_finds_every_form_of_import(source: str, found: list[str]) -> None:
    assert forbidden(imported_modules(source.format(t="test_"))) == [name.format(t="test_") for name in found]


def test_no_test_module_imports_another_test_module_or_the_conftest() -> None:
    modules = sorted(TESTS.glob("test_*.py"))
    assert len(modules) > 10  # the glob found the suite
    bad = {path.name: offences(path) for path in modules if offences(path)}
    assert not bad, ("test modules import from other test modules or from conftest (move what they share "
                     f"to tests/support, fixtures to tests/conftest.py): {bad}")


def test_helpers_in_tests_support_import_no_test_module() -> None:
    bad = {path.name: offences(path) for path in sorted((TESTS / "support").glob("*.py")) if offences(path)}
    assert not bad, f"tests/support imports test modules or conftest: {bad}"
