"""The one-way import rule of docs/architecture.md ("Layers"), checked on the source with ``ast``.

Every module of ``unlearn`` belongs to one layer; ``experiments`` and ``benchmarks`` sit on top:

    0 data, models, objective, task, augment, results, people, runtime, distributed
    1 engine, train
    2 curvature, solvers, kfac
    3 inverse, removal, influence, certified, sisa.*
    4 methods.*
    5 metrics, mia, evaluate, lds, lm_metrics
    6 experiments.*, benchmarks.*

The rule: a module may import modules of its own layer or of lower layers, never of a higher
one — for every ``import`` statement, at module level or inside a function (a lazy import is
still a dependency). Among module-level imports there must be no cycle (a cycle inside one layer
would make import order matter). A module not listed here fails the test: place it in a layer
(and in the document's table) when you add it.

Implicit imports of parent packages (``import unlearn.sisa.plan`` runs ``unlearn/sisa/__init__``)
are not edges here: a package's ``__init__`` is in the same layer as its modules, so it cannot
hide an upward import, and Python resolves a submodule importing its half-initialised parent.

Nothing is imported: the files are parsed, so this runs in well under a second.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("unlearn", "experiments", "benchmarks")

LAYER_NAMES = ["data/models/objective/task", "engine/train", "curvature/solvers",
               "inverse/removal/influence/certified/sisa", "methods", "metrics/mia/evaluate",
               "experiments/benchmarks"]

# module (or package prefix, ending in ".") -> layer
LAYERS: dict[str, int] = {
    "unlearn": 0,  # the package's own (empty) __init__
    "unlearn.data": 0,
    "unlearn.models": 0,
    "unlearn.objective": 0,
    "unlearn.task": 0,
    "unlearn.augment": 0,
    "unlearn.results": 0,
    "unlearn.people": 0,
    "unlearn.runtime": 0,
    "unlearn.distributed": 0,
    "unlearn.engine": 1,
    "unlearn.train": 1,
    "unlearn.curvature": 2,
    "unlearn.solvers": 2,
    "unlearn.solvers.": 2,
    "unlearn.kfac": 2,
    "unlearn.influence": 3,
    "unlearn.inverse": 3,
    "unlearn.removal": 3,
    "unlearn.certified": 3,
    "unlearn.sisa.": 3,
    "unlearn.methods.": 4,
    "unlearn.metrics": 5,
    "unlearn.mia": 5,
    "unlearn.evaluate": 5,
    "unlearn.lds": 5,
    "unlearn.lm_metrics": 5,
    "experiments.": 6,
    "benchmarks.": 6,
}

# Known violations of the rule, each with the reason it is tolerated. Empty: the code follows
# the rule. Add an entry (importer, imported) only with a comment and an issue to remove it.
ALLOWED_UPWARD: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def source_modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            out[module_name(path)] = path
    return out


def layer_of(name: str) -> int | None:
    if name in LAYERS:
        return LAYERS[name]
    best = None
    for key, layer in LAYERS.items():
        if key.endswith(".") and (name + ".").startswith(key):
            if best is None or len(key) > len(best[0]):
                best = (key, layer)
    return None if best is None else best[1]


def _resolve(importer: str, node: ast.ImportFrom, modules: dict[str, Path]) -> str:
    """The absolute module named by ``from X import ...`` (relative levels resolved)."""
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    is_pkg = modules[importer].name == "__init__.py"
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported project module, line, at module level) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    top = set(map(id, tree.body))
    # statements nested in top-level try/if blocks still run at import time
    for stmt in tree.body:
        if isinstance(stmt, ast.If | ast.Try):
            for sub in ast.walk(stmt):
                if isinstance(sub, ast.Import | ast.ImportFrom):
                    top.add(id(sub))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(name, node, modules)
            # ``from pkg import sub`` names the submodule when it is one
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod
                       for a in node.names]
        else:
            continue
        for t in targets:
            # ``import a.b.c`` depends on the longest project module it names
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.append((t, node.lineno, id(node) in top))
    return out


def graph() -> tuple[dict[str, Path], dict[str, list[tuple[str, int, bool]]]]:
    modules = source_modules()
    return modules, {m: imports(m, p, modules) for m, p in modules.items()}


def upward_imports() -> list[str]:
    modules, edges = graph()
    bad = []
    for m, deps in edges.items():
        lm = layer_of(m)
        for d, line, top in deps:
            ld = layer_of(d)
            if lm is None or ld is None or ld <= lm or (m, d) in ALLOWED_UPWARD:
                continue
            where = "module level" if top else "inside a function"
            bad.append(f"{modules[m].relative_to(ROOT)}:{line}: {m} (layer {lm}, "
                       f"{LAYER_NAMES[lm]}) imports {d} (layer {ld}, {LAYER_NAMES[ld]}) "
                       f"at {where}")
    return bad


def module_level_cycles() -> list[list[str]]:
    """Every cycle of the module-level import graph, as a strongly connected component."""
    _, edges = graph()
    succ = {m: sorted({d for d, _, top in deps if top}) for m, deps in edges.items()}
    index, low, stack, on, sccs = {}, {}, [], set(), []

    def visit(v):  # Tarjan's algorithm; the graph is small, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in succ.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in succ.get(v, []):
                sccs.append(sorted(comp))

    for v in sorted(succ):
        if v not in index:
            visit(v)
    return sccs


def test_every_module_has_a_layer():
    missing = sorted(m for m in source_modules() if layer_of(m) is None)
    assert not missing, (f"modules without a layer: {missing}; add them to LAYERS in "
                         "tests/test_architecture.py and to docs/architecture.md")


def test_no_upward_imports():
    bad = upward_imports()
    assert not bad, "imports against the layer order (docs/architecture.md):\n" + "\n".join(bad)


def test_no_module_level_import_cycles():
    cycles = module_level_cycles()
    assert not cycles, f"module-level import cycles: {cycles}"


def test_the_checker_sees_imports():
    """The check can fail: the graph holds known edges of both kinds."""
    _, edges = graph()
    deps = {m: {d: top for d, _, top in e} for m, e in edges.items()}
    assert deps["unlearn.solvers"]["unlearn.curvature"] is True
    assert deps["unlearn.certified"]["unlearn.removal"] is True
    assert deps["unlearn.evaluate"]["unlearn.mia"] is False  # imported inside a function
    assert "unlearn.methods.base" in deps["unlearn.mia"]
    assert layer_of("unlearn.sisa.store") == 3 and layer_of("unlearn.methods") == 4
    assert layer_of("unlearn.sisa_extra") is None  # a prefix matches whole components only


def test_the_checker_catches_an_upward_import_and_a_cycle(tmp_path, monkeypatch):
    """On a made-up tree: engine importing a method (lazily) is upward; data <-> models is a
    module-level cycle; a function-local import does not make a cycle."""
    files = {
        "unlearn/__init__.py": "",
        "unlearn/data.py": "from unlearn import models\n",
        "unlearn/models.py": "import unlearn.data\n",
        "unlearn/objective.py": "def f():\n    from unlearn import engine\n",
        "unlearn/engine.py": "from unlearn import objective\n"
                             "def g():\n    from unlearn.methods.base import Unlearner\n",
        "unlearn/methods/__init__.py": "",
        "unlearn/methods/base.py": "from unlearn.engine import g\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    bad = upward_imports()
    assert len(bad) == 2, bad
    assert any("unlearn.engine (layer 1" in b and "unlearn.methods.base (layer 4" in b
               and "inside a function" in b for b in bad)
    assert any("unlearn.objective (layer 0" in b and "unlearn.engine (layer 1" in b
               for b in bad)
    assert module_level_cycles() == [["unlearn.data", "unlearn.models"]]
