"""Structural rules of the code base: no import cycle in hsae, short functions, the variant contract."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY_PARAMS

ROOT = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 50


# -- import graph -------------------------------------------------------------------------------
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _hsae_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((ROOT / "hsae").rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, function bodies included, except those under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
    return found


def _known_prefix(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of the dotted ``name`` that is an hsae module (``hsae.x.f`` -> ``hsae.x``)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def _absolute(node: ast.ImportFrom, importer: str, modules: dict[str, Path]) -> str:
    if not node.level:
        return node.module or ""
    # Relative import: the importer's package (itself if it is a package's __init__), up level - 1.
    package = importer if modules[importer].name == "__init__.py" else importer.rpartition(".")[0]
    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(node: ast.Import | ast.ImportFrom, importer: str, modules: dict[str, Path]) -> set[str]:
    """hsae modules an import statement runs (ignoring the implicit import of parent packages)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        source = _absolute(node, importer, modules)
        # `from pkg import sub` imports the submodule pkg.sub; `from pkg import name` runs pkg itself.
        names = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
    return {m for m in (_known_prefix(n, modules) for n in names if n.split(".")[0] == "hsae") if m}


def import_graph() -> dict[str, set[str]]:
    modules = _hsae_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[name] = set()
        for node in _runtime_imports(tree):
            graph[name] |= _targets(node, name, modules)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; returns every component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def _cycle_through(start: str, members: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest import cycle start -> ... -> start inside one component (breadth-first)."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    return paths[node] + [start]
                if child not in paths:
                    paths[child] = paths[node] + [child]
                    nxt.append(child)
        frontier = nxt
    return [start]


def test_tarjan_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert sorted(c for c in strongly_connected(graph) if len(c) > 1) == [["a", "b", "c"]]
    assert _cycle_through("a", {"a", "b", "c"}, graph) == ["a", "b", "c", "a"]


def test_no_import_cycle_in_hsae():
    graph = import_graph()
    assert "hsae.variants.base" in graph and "hsae.config" in graph
    cycles = [
        _cycle_through(c[0], set(c), graph)
        for c in strongly_connected(graph)
        if len(c) > 1 or c[0] in graph[c[0]]
    ]
    assert not cycles, "import cycles in hsae:\n" + "\n".join(" -> ".join(c) for c in cycles)


# -- function length ----------------------------------------------------------------------------
def test_no_function_longer_than_50_lines():
    too_long = []
    for path in sorted([*(ROOT / "hsae").rglob("*.py"), *(ROOT / "tune").rglob("*.py")]):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1  # `lineno` is the def line: decorators excluded
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(too_long)


# -- the variant contract -----------------------------------------------------------------------
LOSS_TERMS = {"mse", "l1", "ortho", "entropy", "nce", "matryoshka", "aux"}


def _variant_names():
    from hsae.variants import VARIANTS

    return sorted(VARIANTS)


@pytest.mark.parametrize("variant", _variant_names())
def test_variants_declare_the_contract(variant):
    from hsae.config import SAEConfig
    from hsae.variants import VARIANTS, LossOutput, StepInput, VariantParams, build_sae

    cls = VARIANTS[variant]
    assert issubclass(cls.Params, VariantParams)
    assert isinstance(cls.needs_labels, bool)
    cfg = SAEConfig(variant, 16, 64, TINY_PARAMS.get(variant, {}))
    assert isinstance(cfg.resolved, VariantParams)
    assert cfg.resolved.gram_sample_size() >= 0
    gen = torch.Generator().manual_seed(0)
    sae = build_sae(cfg, generator=gen)
    x = torch.randn(32, 16, generator=gen)
    labels = torch.arange(32) % 2 if cls.needs_labels else None
    out = sae.loss(StepInput(x, labels, step=0, sparsity_scale=0.5))
    assert isinstance(out, LossOutput)
    assert set(out.terms) <= LOSS_TERMS and "mse" in out.terms
    assert all(math.isfinite(float(v.detach())) for v in [*out.terms.values(), out.total])
    out.total.backward()
    sae.on_step_end(1, out.f.detach())
    assert torch.isfinite(sae.W_dec).all()
    temperature = sae.metric_nce_temperature()
    assert isinstance(temperature, float) and temperature > 0


def test_metric_nce_temperature_follows_the_trained_one():
    from hsae.config import SAEConfig
    from hsae.variants import build_sae

    small = {"n_groups_l1": 4, "n_groups_l2": 4}
    assert build_sae(SAEConfig("contrastive_hier", 16, 64, {**small, "nce_temperature": 0.3})) \
        .metric_nce_temperature() == 0.3
    assert build_sae(SAEConfig("dynamic_hier", 16, 64, small)).metric_nce_temperature() == 0.1
