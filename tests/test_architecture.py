"""The package's shape, checked: no import circle, imports one way between its folders, short functions."""

import ast
from pathlib import Path

import imgcls

PACKAGE = Path(imgcls.__file__).parent
# Bottom to top: a module may import from its own layer and the ones below it, never above.
LAYERS = [
    {"errors", "yamlio", "config", "options", "rundir", "runtime", "plotting", "progress"},
    {"data"},
    {"models"},
    {"kernels"},
    {"inference"},
    {"evaluation"},
    {"training"},
    {"export"},
    {"serving"},  # imgcls serve: over the engine (inference) and the export's files; nothing below imports it
    {"reporting"},
    {"cli", "__main__", "__init__"},
]
LONGEST_FUNCTION = 60  # lines; longer ones must say why below
LONG_FUNCTIONS = {}  # "module.function": why it stays longer than LONGEST_FUNCTION


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    """The imgcls modules `path` imports, at module level and inside functions alike (an import in a
    function is still a dependency; hiding a circle there is what this test is for)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("imgcls"):
            for alias in node.names:  # `from imgcls.x import y` imports module imgcls.x.y when there is one
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("imgcls")}
    return {m for m in found if m in MODULES}


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    return next(i for i, names in enumerate(LAYERS) if top in names)


def test_the_graph_is_read():
    """The walk sees the imports that hold the package together (so an empty graph cannot pass)."""
    assert "imgcls.inference.engine" in GRAPH["imgcls.evaluation.evaluate"] | {
        m for dep in GRAPH["imgcls.evaluation.evaluate"] for m in GRAPH[dep]}
    assert len(GRAPH) > 60 and sum(map(len, GRAPH.values())) > 150


def test_no_module_imports_another_in_a_circle():
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str):
        state[node] = "open"
        path.append(node)
        for dep in sorted(GRAPH[node]):
            if state.get(dep) == "open":
                raise AssertionError("import circle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def test_imports_go_one_way_between_the_folders():
    upward = [f"{a} imports {b}" for a, deps in GRAPH.items() for b in deps
              if a.count(".") and b.count(".") and _layer(b) > _layer(a)]
    assert upward == []


def _named_imports(path: Path):
    """(module, name, line) of every `from imgcls... import name`, inside functions too."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("imgcls"):
            for alias in node.names:
                yield node.module, alias.name, node.lineno


def test_every_imgcls_import_resolves():
    """An import inside a function of a name that no longer exists fails only when that path runs (compare on
    a run without stored test predictions did): every one, in the package and the benches, is resolved here."""
    import importlib

    sources = [*MODULES.values(), *sorted((PACKAGE.parents[1] / "bench").glob("*.py"))]
    missing = []
    for path in sources:
        for module, name, line in _named_imports(path):
            try:
                target = importlib.import_module(module)
            except ImportError:
                missing.append(f"{path.name}:{line} {module}")
                continue
            if not hasattr(target, name) and f"{module}.{name}" not in MODULES:
                missing.append(f"{path.name}:{line} {module}.{name}")
    assert missing == []


def test_no_function_is_longer_than_a_screen_without_a_reason():
    long = {}
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > LONGEST_FUNCTION:
                    long[f"{name}.{node.name}"] = lines
    assert set(long) <= set(LONG_FUNCTIONS), f"functions over {LONGEST_FUNCTION} lines: {long}"
