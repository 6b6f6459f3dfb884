"""The package's import graph: module cycles, and imports that go up the declared layers.

    python -m pigeon.tools.layers     # prints the layers and every violation; exit 1 on any

Every `import` and `from ... import` of a `pigeon` module counts, at module level or inside a function
(a lazy import hides a cycle from the interpreter, not from the design). A cycle between modules is an
error. `LAYERS` declares the packages from the bottom up; a package may import its own layer and the
layers below, and an import that goes up is an error too.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Bottom up. Each entry is one layer: top-level modules or packages of `pigeon`.
# The torch-free NumPy pieces (core: images, masking, prompt, decoding) sit below the models that use
# them; serving/ is the Triton side, at the top with the publishing of versions. The evaluation sits
# below training, whose stages log their link of the image chain with it. Error types and file
# formats sit low, and so does the frozen feature network that training's perceptual loss shares with
# the evaluation.
LAYERS = (
    ("files", "config"),
    ("vocab", "specs", "diffusion", "export.errors", "export.manifest", "evaluation.errors"),
    ("interface",),
    ("core", "data"),
    ("models", "evaluation.features"),
    ("checkpoint",),
    ("inference",),
    ("evaluation",),
    ("training",),
    ("export", "interop"),
    ("serving", "export.publish"),
    ("demo", "cli", "tools", "__init__", "__main__"),
)


def module_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """{module: the pigeon modules it imports}, names relative to `pigeon` ("" is the package)."""
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(p for p in parts if p != "__init__") or "__init__"
        modules[name] = path

    def resolve(dotted: str) -> str | None:
        name = dotted.removeprefix("pigeon").lstrip(".")
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        graph[name]  # every module is a node, importing or not
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module == "pigeon" or node.module.startswith("pigeon."):
                    targets = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("pigeon")]
            for target in targets:
                resolved = resolve(target)
                if resolved and resolved != name:
                    graph[name].add(resolved)
    return dict(graph)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def layer_of(module: str) -> int:
    """The layer of the longest declared prefix of `module`."""
    best, depth = None, -1
    for i, layer in enumerate(LAYERS):
        for entry in layer:
            if (module == entry or module.startswith(entry + ".")) and entry.count(".") > depth:
                best, depth = i, entry.count(".")
    if best is None:
        raise ValueError(f"pigeon.{module} is in no layer of pigeon.tools.layers.LAYERS")
    return best


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) where the imported module sits in a higher layer."""
    return sorted(
        (m, t) for m, targets in graph.items() for t in targets if layer_of(t) > layer_of(m)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pigeon.tools.layers", description=__doc__)
    parser.parse_args(argv)
    graph = module_graph()
    print("layers, bottom up:")
    for i, layer in enumerate(LAYERS):
        print(f"  {i:2d}  {', '.join(layer)}")
    found = cycles(graph)
    up = upward_imports(graph)
    for component in found:
        print("cycle: " + " <-> ".join(f"pigeon.{m}" for m in component))
    for m, t in up:
        print(f"upward: pigeon.{m} (layer {layer_of(m)}) imports pigeon.{t} (layer {layer_of(t)})")
    print(f"{len(graph)} modules, {len(found)} cycles, {len(up)} upward imports")
    return 1 if found or up else 0


if __name__ == "__main__":
    sys.exit(main())
