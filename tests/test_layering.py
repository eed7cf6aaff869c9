"""The house's floors (docs/architecture.md): a module imports only from its own floor or below, and no modules import
each other in a circle. Read from the source with ast, so deferred imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "moefy"

# Top floor first. A module's floor is that of its longest listed prefix.
FLOORS = [
    ["cli", "recipe_flags", "__main__", "demo", "api"],
    ["train", "evaluate", "analyze"],
    ["construct", "export", "profile"],
    ["data"],
    ["models"],
    ["sources", "families", "tensor_io", "tensor_writer", "recipes", "atomic", "progress", "errors", "host_memory",
     "seeding", "__init__"],
]


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def floor(module: str) -> int:
    top = module.split(".")[0]
    for level, names in enumerate(FLOORS):
        if top in names:
            return level
    raise AssertionError(f"moefy.{module} is on no floor: add it to FLOORS and docs/architecture.md")


def imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    known = {module_name(p) for p in SRC.rglob("*.py")}
    for path in SRC.rglob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moefy"):
                names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("moefy")]
            for name in names:  # the deepest moefy module the name lives in
                parts = name.split(".")[1:]
                while parts and ".".join(parts) not in known:
                    parts.pop()
                if parts:
                    found.add(".".join(parts))
        graph[module_name(path)] = found - {module_name(path)}
    return graph


def test_no_import_climbs_a_floor():
    up = [f"moefy.{a} -> moefy.{b}" for a, deps in imports().items() for b in deps
          if b != "__init__" and floor(b) < floor(a)]
    assert not up, "imports that climb to a higher floor:\n" + "\n".join(sorted(up))


def test_no_import_circles():
    graph = imports()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
