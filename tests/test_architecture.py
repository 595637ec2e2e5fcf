"""The package's layering, checked from the source: no import cycles, and no module imports a higher layer.

The import graph is read with `ast` (no module is imported): every `import` and `from ... import` anywhere in a
file counts, function-local ones included (a local import dodges a cycle at import time, not in the design);
relative imports are resolved; `from pkg import name` is an edge to the submodule `pkg.name` when there is one,
else to `pkg`. Importing `a.b.c` also runs `a/__init__` and `a/b/__init__`, so an edge to a submodule is an edge
to each package enclosing it too, except the importer's own enclosing packages (already running by then).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: Layers, bottom to top: a module may import its own layer and the ones below, never one above. The longest
#: matching prefix decides (the package root `forgetless` itself matches only exactly).
LAYERS: dict[str, int] = {
    # 0: foundation: errors, files, locks, progress, precision; the strict config base, YAML loading and
    # validation-error formatting (schema), the shared config sections (config), the model fingerprint, block
    # finding, the result records (task gain, retention change), the tiny toy model builder; the scoring
    # engine's primitives (retention.lm, retention.metrics)
    "forgetless": 0,
    "forgetless.errors": 0,
    "forgetless.faults": 0,
    "forgetless.io": 0,
    "forgetless.lock": 0,
    "forgetless.progress": 0,
    "forgetless.precision": 0,
    "forgetless.allocator": 0,
    "forgetless.provenance": 0,
    "forgetless.schema": 0,
    "forgetless.config": 0,
    "forgetless.fingerprint": 0,
    "forgetless.blocks": 0,
    "forgetless.plugins": 0,
    "forgetless.results": 0,
    "forgetless.output": 0,
    "forgetless.tiny": 0,
    "forgetless.retention.lm": 0,
    "forgetless.retention.metrics": 0,
    # 1: data, models, retention (tasks, suites, evaluation), training methods and mitigations (plugins, one file
    # each), distributed helpers, the recipe
    "forgetless.data": 1,
    "forgetless.models": 1,
    "forgetless.retention": 1,
    "forgetless.mitigations": 1,
    "forgetless.methods": 1,
    "forgetless.distributed": 1,
    "forgetless.recipe": 1,
    # 2: training (the run, its Trainer callbacks, the retention monitor / guard) and `forgetless eval`'s front
    # end, which loads trained run directories through train.model
    "forgetless.train": 2,
    "forgetless.guard": 2,
    "forgetless.retention.api": 2,
    # 3: reports: they read run, sweep and sequence directories; orchestration imports them, never the reverse
    "forgetless.report": 3,
    # 4: orchestration
    "forgetless.orchestration": 4,
    "forgetless.sweep": 4,
    "forgetless.continual": 4,
    "forgetless.merge": 4,
    "forgetless.demo": 4,
    # 5: command lines (and the test helpers that drive them)
    "forgetless.cli": 5,
    "forgetless.__main__": 5,
    "forgetless.data.cli": 5,
    "forgetless.models.cli": 5,
    "forgetless.testing": 5,
    "forgetless.reference": 5,
}


# ---------------------------------------------------------------- the graph


def modules(src: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of `package` under `src` (a package is its __init__)."""
    out = {}
    for f in sorted((src / package).rglob("*.py")):
        parts = f.relative_to(src).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def import_edges(src: Path, package: str) -> dict[str, list[tuple[str, Path, int]]]:
    """module -> [(imported module, file, line)], imports of modules of `package` only."""
    mods = modules(src, package)
    edges: dict[str, list[tuple[str, Path, int]]] = {m: [] for m in mods}

    def known(name: str) -> str | None:
        """The module `name` is, or the nearest enclosing one of the package (import a.b.c runs a.b.c)."""
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    for mod, path in mods.items():
        here = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[: len(here) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    targets.append(sub if sub in mods else target)
            for t in targets:
                if t == package or t.startswith(package + "."):
                    k = known(t)
                    if k is None:
                        continue
                    parts = k.split(".")
                    for n in range(1, len(parts) + 1):  # k and the packages enclosing it
                        target = ".".join(parts[:n])
                        if target in mods and target != mod and not mod.startswith(target + "."):
                            edges[mod].append((target, path, node.lineno))
    return edges


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components in no particular order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                out.append(sorted(comp))
    return out


def a_cycle(start: str, comp: set[str], edges: dict[str, list[tuple[str, Path, int]]]) -> list[tuple[str, Path, int]]:
    """The shortest import chain from `start` back to itself inside `comp`, as (imported module, file, line)."""
    prev: dict[str, tuple[str, Path, int]] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w, f, line in edges[v]:
                if w not in comp or w in prev:
                    continue
                prev[w] = (v, f, line)
                if w == start:
                    chain = []
                    node = start
                    while True:
                        v0, f0, l0 = prev[node]
                        chain.append((node, f0, l0))
                        node = v0
                        if node == start:
                            return chain[::-1]
                nxt.append(w)
        frontier = nxt
    return []


def cycle_problems(src: Path, package: str) -> list[str]:
    edges = import_edges(src, package)
    graph = {m: {t for t, _, _ in e} for m, e in edges.items()}
    problems = []
    for comp in strongly_connected(graph):
        if len(comp) < 2:
            continue
        chain = a_cycle(comp[0], set(comp), edges)
        steps = " -> ".join(f"{t} ({f.relative_to(src)}:{line})" for t, f, line in chain)
        problems.append(f"import cycle among {len(comp)} modules {comp}: {comp[0]} -> {steps}")
    return problems


def layer_of(module: str, layers: dict[str, int]) -> int | None:
    name = module
    while name:
        if name in layers and (name == module or "." in name):  # the root package matches only itself
            return layers[name]
        name = name.rpartition(".")[0]
    return None


def layer_problems(src: Path, package: str, layers: dict[str, int]) -> list[str]:
    edges = import_edges(src, package)
    problems = [f"{m} has no layer: add it (or a prefix of it) to LAYERS" for m in edges if layer_of(m, layers) is None]
    for m, targets in edges.items():
        mine = layer_of(m, layers)
        for t, f, line in targets:
            theirs = layer_of(t, layers)
            if mine is not None and theirs is not None and theirs > mine:
                problems.append(f"{f.relative_to(src)}:{line}: {m} (layer {mine}) imports {t} (layer {theirs}), "
                                "a higher layer")
    return problems


# ---------------------------------------------------------------- the checks


def test_no_import_cycles():
    problems = cycle_problems(SRC, "forgetless")
    assert not problems, "\n".join(problems)


def test_no_module_imports_a_higher_layer():
    problems = layer_problems(SRC, "forgetless", LAYERS)
    assert not problems, "\n".join(problems)


def test_the_graph_sees_local_relative_and_submodule_imports():
    edges = {m: {t for t, _, _ in e} for m, e in import_edges(SRC, "forgetless").items()}
    assert "forgetless.methods.bottleneck" in edges["forgetless.train.model"]  # from ..methods.bottleneck import
    assert "forgetless.retention.metrics" in edges["forgetless.retention.evaluate"]  # from . import metrics as M
    assert "forgetless.distributed" in edges["forgetless.guard"]  # from . import distributed as dist
    assert "forgetless.models" in edges["forgetless.train.run"]  # from ..models.catalog import: runs models/__init__
    assert "forgetless.train" in edges["forgetless.cli"]  # a lazy import inside a command function
    assert "forgetless.report" not in edges["forgetless.train.run"]  # training never renders reports itself


# ---------------------------------------------------------------- the checks can fail


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / "pkg" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def test_self_check_a_two_module_cycle_is_found_and_named(tmp_path):
    src = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "def f():\n    from . import b  # local: still an edge\n    return b\n",
        "b.py": "from pkg.a import f\n",
        "c.py": "from .b import f\n",
    })
    (problem,) = cycle_problems(src, "pkg")
    assert "['pkg.a', 'pkg.b']" in problem
    assert "pkg.a -> pkg.b (pkg/a.py:2) -> pkg.a (pkg/b.py:1)" in problem
    assert cycle_problems(_package(tmp_path / "ok", {"__init__.py": "", "a.py": "", "b.py": "from . import a\n"}),
                          "pkg") == []


def test_self_check_a_cycle_through_a_package_init_is_found(tmp_path):
    """z imports sub.x, which runs sub/__init__ first, which imports z: a cycle although sub.x imports nothing."""
    src = _package(tmp_path, {
        "__init__.py": "",
        "sub/__init__.py": "from ..z import q\n",
        "sub/x.py": "y = 1\n",
        "z.py": "q = 1\n\n\ndef f():\n    from pkg.sub.x import y\n    return y\n",
    })
    (problem,) = cycle_problems(src, "pkg")
    assert "['pkg.sub', 'pkg.z']" in problem and "pkg/z.py:5" in problem and "pkg/sub/__init__.py:1" in problem
    # a submodule importing its sibling runs no package __init__ it is not already inside: no cycle
    assert cycle_problems(_package(tmp_path / "ok", {"__init__.py": "from .a import v\n", "a.py": "v = 1\n",
                                                     "b.py": "from .a import v\n"}), "pkg") == []


def test_self_check_an_upward_import_is_named_with_file_and_line(tmp_path):
    src = _package(tmp_path, {
        "__init__.py": "",
        "low.py": "import json\n\n\ndef g():\n    from pkg.high import h\n    return h\n",
        "high.py": "from .low import g\n",
        "stray.py": "",
    })
    problems = layer_problems(src, "pkg", {"pkg": 0, "pkg.low": 0, "pkg.high": 1})
    assert "pkg/low.py:5: pkg.low (layer 0) imports pkg.high (layer 1), a higher layer" in problems
    assert "pkg.stray has no layer: add it (or a prefix of it) to LAYERS" in problems
    assert len(problems) == 2


@pytest.mark.parametrize(("module", "layer"), [
    ("forgetless", 0), ("forgetless.retention.evaluate", 1), ("forgetless.retention.api", 2),
    ("forgetless.data.cli", 5), ("forgetless.nowhere", None),
])
def test_layer_lookup_takes_the_longest_prefix(module, layer):
    assert layer_of(module, LAYERS) == layer


def test_every_module_is_in_the_table():
    mods = modules(SRC, "forgetless")
    assert [m for m in mods if layer_of(m, LAYERS) is None] == []
