"""The import rules of loadgen, read from the source (every import statement, at any depth, including
those under TYPE_CHECKING and inside functions):

- layers one way: a module imports only from its own layer or lower ones (LAYERS, lowest first);
- no cycles between modules;
- the load generator imports no reference-server package (servers.*): what both need at a low level
  (timers, keep-awake, dtype tables, the TorchServe .proto stubs) is in loadgen.lowlevel, which
  imports nothing else of loadgen.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LAYERS: tuple[tuple[str, ...], ...] = (
    ("loadgen.lowlevel",),
    ("loadgen.units", "loadgen.files", "loadgen.errors", "loadgen.flags", "loadgen.outcome", "loadgen.goodput",
     "loadgen.patterns.trace"),  # a trace file's rows: read while a scenario is validated
    ("loadgen.recorder",),
    ("loadgen.sinks", "loadgen.slo", "loadgen.serverside"),  # sinks write what the recorder holds
    ("loadgen.protocols",),  # a client returns an Outcome; it never records
    ("loadgen.scenario",),  # the validated run; its [target] is the protocols' options models
    ("loadgen.patterns",),  # arrival schedules of a scenario's pattern
    ("loadgen.driver",),  # Locust users, dispatcher, run, distributed master/worker
    ("loadgen.sweep",),  # plans, steps, verdict: above the runs they order
    # The verbs' work; locustfile is Locust's own -f entry point, a command like them.
    ("loadgen._runcmd", "loadgen._sweepcmd", "loadgen._democmd", "loadgen._comparecmd", "loadgen.compare",
     "loadgen.report", "loadgen.driver.locustfile"),
    ("loadgen.options",),
    ("loadgen.cli", "loadgen.__main__"),
    ("loadgen",),  # the package's lazy re-exports
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, name: str) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(path): path for path in (ROOT / "loadgen").rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        graph[name] = {module for module in _imports(path, name) if module in paths and module != name}
    graph["__servers__"] = set()
    for name, path in paths.items():
        if any(module == "servers" or module.startswith("servers.") for module in _imports(path, name)):
            graph[name].add("__servers__")
    return graph


def _layer(module: str) -> int:
    best, rank = -1, None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    assert rank is not None, f"{module} is in no layer: add it to LAYERS"
    return rank


def test_every_module_has_a_layer() -> None:
    for module in _graph():
        if module != "__servers__":
            _layer(module)


def test_layers_point_one_way() -> None:
    wrong = []
    for module, imported in sorted(_graph().items()):
        if module == "__servers__":
            continue
        for other in sorted(imported - {"__servers__"}):
            if _layer(other) > _layer(module):
                wrong.append(f"{module} (layer {_layer(module)}) imports {other} (layer {_layer(other)})")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_the_generator_imports_no_reference_server() -> None:
    offenders = sorted(module for module, imported in _graph().items() if "__servers__" in imported)
    assert not offenders, f"loadgen modules importing servers.*: {offenders}"


def test_lowlevel_imports_nothing_else_of_loadgen() -> None:
    graph = _graph()
    for module, imported in graph.items():
        if module.startswith("loadgen.lowlevel"):
            assert all(other.startswith("loadgen.lowlevel") for other in imported), (module, imported)


def test_no_import_cycles() -> None:
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


def test_the_rules_see_a_planted_cycle(tmp_path) -> None:
    """The reader resolves relative and `from pkg import module` imports (else the rules see nothing)."""
    package = tmp_path / "loadgen" / "pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from . import b\n")
    (package / "b.py").write_text("def f():\n    from loadgen.pkg.a import x\n")
    found_a = _imports(package / "a.py", "loadgen.pkg.a")
    found_b = _imports(package / "b.py", "loadgen.pkg.b")
    assert "loadgen.pkg.b" in found_a and "loadgen.pkg.a" in found_b
