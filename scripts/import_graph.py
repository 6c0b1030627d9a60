"""The import graph of the `verispec` package: import cycles, and imports that point up the layers.

    python scripts/import_graph.py [--allow-function-level] [--root DIR]

This script reads every module under verispec/ with `ast` and imports none of them. It collects
each import of a verispec module in two groups:

- module-level imports, which run when the module is imported. Imports in class bodies, `try`
  blocks and ordinary `if` blocks count here;
- function-level imports, which sit inside a function and run only when it is called.

Imports under `if TYPE_CHECKING:` are ignored (their `else:` branch counts). Dynamic imports are
ignored too: `importlib.import_module`, the lazy names of a package's `__getattr__`
(`verispec/lazy.py`), and the proposer registry's "module:function" builder strings. An import
of `a.b.c` leads to `a.b.c` only, not to the packages `a` and `a.b` that Python runs first.
`from a.b import c` leads to `a.b.c` when that is a module, and to `a.b` otherwise.

It reports:

1. import cycles among module-level imports (strongly connected modules, each with one example
   loop and the imports between its modules);
2. cycles that some function-level imports close: modules that reach each other only once
   function-level imports count, with those imports listed;
3. upward arrows: a module that imports a module of a higher layer, at either level.

Layers, from low to high. A module may import its own layer and the layers below it. A module
belongs to the layer of its longest listed prefix, so `verispec.proposers.base` is in `core`
while `verispec.proposers` is in `proposers`.

    base          verispec (its names load lazily), errors, lazy, text, stats, validation, prompts,
                  proposers.names (the proposer registry, which settings read): no other layer
    config        settings (config) and the command-line flags built from them (flags)
    models        the models and their backends
    core          the engine, and the proposer protocol it drives (proposers.base). The core
                  never imports a concrete proposer (draft, ngram, remote)
    proposers     the concrete proposers, and the package that builds one by name
    assembly      settings in, a ready engine out (assemble)
    services      what the server calls on for each request: policy gate, audit trail, tool calls
    applications  server, scale (the server on Ray), edge, offline batch, tools, training
    cli           the root parser

The script exits 1 when there is a module-level cycle, an upward arrow, or a module in no layer.
A function-level cycle also makes it exit 1, unless `--allow-function-level` is given; then it is
only reported. `tests/test_layers.py` runs the same analysis.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "verispec"

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "base",
        (
            "verispec",
            "verispec.errors",
            "verispec.lazy",
            "verispec.text",
            "verispec.stats",
            "verispec.validation",
            "verispec.prompts",
            "verispec.proposers.names",
        ),
    ),
    ("config", ("verispec.config", "verispec.flags")),
    ("models", ("verispec.models",)),
    ("core", ("verispec.core", "verispec.proposers.base")),
    ("proposers", ("verispec.proposers",)),
    ("assembly", ("verispec.assemble",)),
    ("services", ("verispec.policy", "verispec.audit", "verispec.tool_calls")),
    (
        "applications",
        (
            "verispec.server",
            "verispec.scale",
            "verispec.edge",
            "verispec.offline",
            "verispec.tools",
            "verispec.training",
        ),
    ),
    ("cli", ("verispec.cli",)),
)


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the verispec module it imports
    path: Path  # the importing module's file
    line: int
    function_level: bool

    def __str__(self) -> str:
        where = "in a function" if self.function_level else "module level"
        return f"{self.path}:{self.line}: {self.source} imports {self.target} ({where})"


@dataclass(frozen=True)
class Graph:
    modules: dict[str, Path]  # dotted name -> file, relative to the root
    imports: tuple[Import, ...]

    def edges(self, function_level: bool) -> dict[str, set[str]]:
        """Module -> the modules it imports: module-level imports only, or all of them too."""
        edges: dict[str, set[str]] = {name: set() for name in self.modules}
        for imp in self.imports:
            if function_level or not imp.function_level:
                edges[imp.source].add(imp.target)
        return edges


def modules(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of the package: dotted name -> its file, relative to the root."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path.relative_to(root)
    return found


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports_in(name: str, path: Path, root: Path, known: dict[str, Path]) -> list[Import]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top = name.partition(".")[0]
    found: list[Import] = []

    def known_module(dotted: str) -> str | None:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    def add(target: str | None, node: ast.stmt, function_level: bool) -> None:
        imp = Import(name, target, path, node.lineno, function_level)
        if target is not None and target != name and imp not in found:  # one per statement and module
            found.append(imp)

    def visit(nodes: Iterable[ast.AST], function_level: bool) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and _type_checking(node.test):
                visit(node.orelse, function_level)
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.partition(".")[0] == top:
                        add(known_module(alias.name), node, function_level)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    module = node.module or ""
                if module.partition(".")[0] == top:
                    for alias in node.names:
                        submodule = f"{module}.{alias.name}"
                        add(submodule if submodule in known else known_module(module), node, function_level)
            inner = function_level or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            visit(ast.iter_child_nodes(node), inner)

    visit(ast.parse((root / path).read_text(), filename=str(path)).body, False)
    return found


def graph(root: Path = ROOT, package: str = PACKAGE) -> Graph:
    """The package's modules and every import of one of them by another (TYPE_CHECKING ones aside)."""
    known = modules(root, package)
    imports = [imp for name, path in known.items() for imp in _imports_in(name, path, root, known)]
    return Graph(known, tuple(imports))


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Groups of two or more modules that all reach each other (Tarjan), each sorted, in name order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(edges) + 100))
    try:
        for node in sorted(edges):
            if node not in index:
                connect(node)
    finally:
        sys.setrecursionlimit(limit)
    return sorted(groups)


def path(edges: dict[str, set[str]], start: str, end: str, inside: set[str]) -> list[str]:
    """A shortest path of imports from `start` to `end` among the modules `inside`: [start, ..., end]."""
    came_from: dict[str, str] = {start: start}
    frontier = [start]
    while frontier and end not in came_from:
        following = []
        for node in frontier:
            for target in sorted(edges[node] & inside):
                if target not in came_from:
                    came_from[target] = node
                    following.append(target)
        frontier = following
    if end not in came_from:
        raise ValueError(f"no path from {start} to {end}")
    steps = [end]
    while steps[-1] != start:
        steps.append(came_from[steps[-1]])
    return steps[::-1]


@dataclass(frozen=True)
class Cycle:
    modules: list[str]
    example: list[str]  # one loop through them: [a, b, ..., a]
    imports: list[Import]  # the imports between them (for a function-level cycle: the function-level ones)

    def __str__(self) -> str:
        lines = [f"{len(self.modules)} modules: {' -> '.join(self.example)}"]
        lines += [f"    {imp}" for imp in self.imports]
        return "\n".join(lines)


def module_level_cycles(g: Graph) -> list[Cycle]:
    """Cycles of module-level imports: these run, in some order, whenever one of the modules is imported."""
    edges = g.edges(function_level=False)
    cycles = []
    for members in strongly_connected(edges):
        inside = set(members)
        between = [i for i in g.imports if not i.function_level and i.source in inside and i.target in inside]
        first = between[0]
        example = [first.source, *path(edges, first.target, first.source, inside)]
        cycles.append(Cycle(members, example, between))
    return cycles


def function_level_cycles(g: Graph) -> list[Cycle]:
    """Cycles that function-level imports close: groups of modules that reach each other only once
    imports inside functions count too. Each lists its function-level imports, less those within
    one module-level cycle or beside a module-level import of the same module."""
    edges = g.edges(function_level=True)
    module_edges = g.edges(function_level=False)
    module_groups = [set(c.modules) for c in module_level_cycles(g)]
    cycles = []
    for members in strongly_connected(edges):
        if set(members) in module_groups:
            continue  # function-level imports add no module to a module-level cycle
        inside = set(members)
        closing = [
            i
            for i in g.imports
            if i.function_level
            and i.source in inside
            and i.target in inside
            and i.target not in module_edges[i.source]
            and not any(i.source in group and i.target in group for group in module_groups)
        ]
        first = closing[0]
        example = [first.source, *path(edges, first.target, first.source, inside)]
        cycles.append(Cycle(members, example, closing))
    return cycles


def layer(module: str) -> tuple[int, str] | None:
    """(rank, name) of the module's layer: that of its longest listed prefix; None when unlisted."""
    best: tuple[int, int, str] | None = None
    for rank, (name, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or (prefix != PACKAGE and module.startswith(prefix + "."))
            if matches and (best is None or len(prefix) > best[0]):
                best = (len(prefix), rank, name)
    return None if best is None else best[1:]


def unplaced(g: Graph) -> list[str]:
    """Modules in no layer (a new package must be given one)."""
    return [name for name in g.modules if layer(name) is None]


def upward(g: Graph) -> list[Import]:
    """Imports of a module in a higher layer than the importer's, at either level."""
    found = []
    for imp in g.imports:
        source, target = layer(imp.source), layer(imp.target)
        if source is not None and target is not None and target[0] > source[0]:
            found.append(imp)
    return found


def _section(title: str, items: list, empty: str = "none") -> list[str]:
    lines = [f"{title}: {len(items) or empty}"]
    for item in items:
        text = str(item)
        if isinstance(item, Import):
            text += f"  [{layer(item.source)[1]} -> {layer(item.target)[1]}]"
        lines += ["  " + line for line in text.splitlines()]
    return lines


def report(g: Graph, allow_function_level: bool = False) -> tuple[list[str], bool]:
    """The report's lines, and whether every rule holds."""
    module_cycles, function_cycles = module_level_cycles(g), function_level_cycles(g)
    arrows, missing = upward(g), unplaced(g)
    counted = sum(not i.function_level for i in g.imports)
    lines = [
        f"{len(g.modules)} modules; {len(g.imports)} imports of one verispec module by another: "
        f"{counted} module-level, {len(g.imports) - counted} in functions (TYPE_CHECKING-only ones not counted)",
        "layers, low to high: " + " < ".join(name for name, _ in LAYERS),
        "",
        *_section("module-level import cycles", module_cycles),
        "",
        *_section("cycles closed by function-level imports", function_cycles),
        "",
        *_section("upward arrows, module level", [i for i in arrows if not i.function_level]),
        "",
        *_section("upward arrows, in functions", [i for i in arrows if i.function_level]),
    ]
    if missing:
        lines += ["", *_section("modules in no layer (add them to LAYERS)", missing)]
    ok = not (module_cycles or arrows or missing or (function_cycles and not allow_function_level))
    lines += ["", "OK" if ok else "FAILED"]
    return lines, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--allow-function-level",
        action="store_true",
        help="report cycles closed by function-level imports without failing",
    )
    parser.add_argument("--root", type=Path, default=ROOT, help="the directory that holds verispec/")
    args = parser.parse_args(argv)
    lines, ok = report(graph(args.root), args.allow_function_level)
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
