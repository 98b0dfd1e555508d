"""The package's layering (README, "Layout"): no import circles, and models/ never imports
the layers above it. Imports inside functions count too: a lazy import still ties modules."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Set

SRC = Path(__file__).resolve().parents[1] / "src"
# What models/ may build on: networks, their layers and entropy models, losses, tiling and
# the runtime helpers below the codecs. Never the codecs, jobs, CLI, container or eval.
MODELS_MAY_IMPORT = ("ulbcodec.models", "ulbcodec.layers", "ulbcodec.entropy", "ulbcodec.losses",
                     "ulbcodec._compressai", "ulbcodec.tiling", "ulbcodec.threads", "ulbcodec.placement",
                     "ulbcodec.resources", "ulbcodec.packages")


def module_graph() -> Dict[str, Set[str]]:
    files = {".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (SRC / "ulbcodec").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in files and t != name}
        graph[name] = deps
    return graph


def test_no_import_circles():
    graph = module_graph()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_models_import_nothing_above_them():
    upward = {(m, d) for m, deps in module_graph().items() if m.startswith("ulbcodec.models")
              for d in deps if not d.startswith(MODELS_MAY_IMPORT)}
    assert not upward, f"models/ imports layers above it: {sorted(upward)}"
