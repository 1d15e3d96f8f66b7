"""The house's import rules, read from the source: data flows one way (model -> hooks -> masks
-> circuits -> reports), no module imports one above it, leaves import only ``errors``, and no
import (function-local ones included) closes a cycle."""
import ast
import re
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]

# Each unit (a top-level module or subpackage of circuitlab) may import units of lower rows
# only. A new module needs a row: placing it is deciding where it sits in the flow.
LAYERS = [
    ("errors",),
    ("files", "preprocessing", "kernels", "deprecations", "distributed",  # leaves
     "execution"),
    ("checkpoints", "backgrounds", "cache", "hook_points", "engine", "sources", "folding",
     "aot"),
    ("readers",),                                # plain-torch reads for hot loops
    ("families", "interventions", "hook_names"),
    ("hooked_model",),                           # hooks
    ("synthetic",),                              # the benchmark: its data, models and cache
    ("registry",),                               # which names load what
    ("data", "zoo"),                             # images in; models by name
    ("metrics", "features", "runs"),             # feature dictionaries on taps; folder runs
    ("explain", "baselines"),                    # masks
    ("circuits",),                               # circuits
    ("report",),                                 # reports
    ("cli",),
    ("__main__",),                               # python -m circuitlab, torchrun -m circuitlab
]
RANK = {unit: i for i, row in enumerate(LAYERS) for unit in row}
LEAVES = ("files", "preprocessing", "kernels", "deprecations", "distributed", "execution")


def _modules() -> dict:
    """dotted name -> file, with the top-level kernels/ folder installed as circuitlab.kernels."""
    out = {}
    for folder, prefix in ((ROOT / "circuitlab", ("circuitlab",)),
                           (ROOT / "kernels", ("circuitlab", "kernels"))):
        for path in folder.rglob("*.py"):
            parts = prefix + path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _type_checking_only(tree: ast.AST) -> set:
    """Import nodes under ``if TYPE_CHECKING:`` (never run)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    return skip


def _imports(name: str, path: Path, modules: dict) -> set:
    """Every circuitlab module ``name`` imports, at module level or inside a function."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_only(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            # `from pkg import sub` imports the submodule; `from mod import name` the module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
                # importing a.b.c runs the __init__ of a.b too, unless it is our own package
                parent = target.rpartition(".")[0]
                while parent and not (name + ".").startswith(parent + "."):
                    found.add(parent)
                    parent = parent.rpartition(".")[0]
    return found


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    g = nx.DiGraph()
    g.add_nodes_from(modules)
    for name, path in modules.items():
        g.add_edges_from((name, t) for t in _imports(name, path, modules))
    return g


def _unit(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_unit_has_a_layer(graph):
    units = {_unit(n) for n in graph if _unit(n)}
    assert units <= set(RANK), f"place these in LAYERS: {sorted(units - set(RANK))}"


def test_no_import_cycle(graph):
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import cycles: {cycles[:3]}"


def test_no_module_imports_one_above_it(graph):
    bad = [(a, b) for a, b in graph.edges
           if _unit(a) and _unit(b) and _unit(a) != _unit(b)
           and RANK[_unit(b)] >= RANK[_unit(a)]]
    assert not bad, f"imports against the flow: {bad}"


def test_leaves_import_only_errors(graph):
    for a, b in graph.edges:
        if _unit(a) in LEAVES and _unit(b) != _unit(a):
            assert b == "circuitlab.errors", (a, b)


def test_the_graph_sees_function_local_imports(graph):
    # the oracle must catch what it is for: cli imports zoo inside functions only
    src = (ROOT / "circuitlab" / "cli" / "_common.py").read_text()
    assert not re.search(r"^from \.\.zoo import", src, re.M)
    assert ("circuitlab.cli._common", "circuitlab.zoo") in graph.edges
    assert ("circuitlab.explain.losses", "circuitlab.kernels") in graph.edges


def test_no_bare_kernels_import():
    # a top-level `kernels` is the PyPI package of that name, not ours
    pattern = re.compile(r"\b(import|from) kernels\b")
    hits = [f"{p.relative_to(ROOT)}:{i}" for folder in ("circuitlab", "kernels", "analyses",
                                                         "benchmarks", "tests")
            for p in (ROOT / folder).rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


def test_circuits_edges_is_the_only_caller_of_the_edge_score_op():
    callers = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "circuitlab").rglob("*.py")
                     if re.search(r"\bedge_scores\b", p.read_text()))
    assert callers == ["circuitlab/circuits/edges.py"]


def test_every_torch_load_reads_weights_only():
    """A pickle that is not plain tensors can run code under torch 2.4 / 2.5 (issue 20)."""
    found = []
    for folder in ("circuitlab", "kernels", "analyses", "benchmarks", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            for m in re.finditer(r"torch\.load\(", text):
                depth, end = 0, m.end() - 1
                for end in range(m.end() - 1, len(text)):      # to the matching parenthesis
                    depth += {"(": 1, ")": -1}.get(text[end], 0)
                    if depth == 0:
                        break
                call = text[m.start():end + 1]
                if "weights_only=True" not in call:
                    found.append(f"{path.relative_to(ROOT)}: {call}")
    assert not found, found
