"""The house's shape: no two modules of lmtune import each other (directly or round a circle), and `import lmtune`
does no heavy work."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """module -> the package's modules it imports (at any depth of its code; imports under TYPE_CHECKING excepted)."""
    modules = {}
    for file in (root / package).rglob("*.py"):
        parts = list(file.relative_to(root).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, file in modules.items():
        tree = ast.parse(file.read_text(encoding="utf-8"))
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(node.test) for b in node.body for n in ast.walk(b)}
        base = module if file.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                parent = base
                for _ in range(max(node.level - 1, 0)):
                    parent = parent.rpartition(".")[0]
                mod = (f"{parent}.{node.module}" if node.module else parent) if node.level else node.module or ""
                subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in modules]
                targets = subs if len(subs) == len(node.names) else [mod, *subs]  # `from pkg import submodule`
            else:
                continue
            graph[module].update(t for t in map(known, targets) if t and t != module)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_lmtune_has_no_import_cycle() -> None:
    assert cycles(import_graph(SRC, "lmtune")) == []


def test_the_check_finds_a_planted_cycle(tmp_path: Path) -> None:
    package = tmp_path / "toy"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from toy.b import thing\n")
    (package / "b.py").write_text("def thing():\n    from toy import c\n")  # inside a function counts too
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import toy.b\n"
                                  "import toy.a\n")
    (package / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from toy import a\n")
    assert cycles(import_graph(tmp_path, "toy")) == [["toy.a", "toy.b", "toy.c"]]  # d's import is typing only


def test_importing_lmtune_loads_no_heavy_library() -> None:
    heavy = ("torch", "transformers", "datasets", "accelerate", "peft", "optuna")
    code = f"import sys, lmtune; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
