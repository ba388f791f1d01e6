"""The package's shape: no import cycle between its modules, and nothing but the entry point imports `cli`
(commands parse argv into configs and call library functions; stages call those functions, never the CLI)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "nanoseek"


def _module(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports (at any depth: lazy imports inside functions count too)."""
    modules = {_module(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(max(node.level - 1, 0)):
                    base = base.rpartition(".")[0]
                target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module or ""
                candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            deps |= {c for c in candidates if c in modules and c != name}
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first search (each reported once, from where the search met it)."""
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                found.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_cycle_finder_sees_a_cycle(tmp_path):
    pkg = tmp_path / "nanoseek"
    (pkg / "rl").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "cli.py").write_text("from .rl import distill\n")
    (pkg / "rl" / "__init__.py").write_text("")
    (pkg / "rl" / "distill.py").write_text("def main():\n    from ..cli import run_command\n")
    (pkg / "io.py").write_text("import os\n")
    graph = import_graph(pkg)
    assert graph["nanoseek.rl.distill"] == {"nanoseek.cli"} and graph["nanoseek.io"] == set()
    assert cycles(graph) == [["nanoseek.cli", "nanoseek.rl.distill", "nanoseek.cli"]]


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_only_the_entry_point_imports_the_cli():
    importers = sorted(name for name, deps in import_graph().items() if "nanoseek.cli" in deps)
    assert importers == ["nanoseek.__main__"]
