"""The package's shape: subpackages import only downward along the chain, no module imports itself back through
others, and no module reaches into another's private members."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import grimp
import pytest

import nl_rewrite

# Highest first: a layer may import any layer below it, never one above. This is the pipeline, read bottom-up.
LAYERS = ("cli", "pipeline", "evaluation", "replacements", "trained", "interp", "latents", "coders", "llm", "data", "model", "parallel")

# Underscore names that are public API of a third-party library, not private members.
PUBLIC_UNDERSCORE = {"_replace", "_asdict", "_fields", "_make"}


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("nl_rewrite")


def test_subpackages_import_only_downward(graph):
    illegal = graph.find_illegal_dependencies_for_layers(layers=[f"nl_rewrite.{name}" for name in LAYERS])
    found = sorted(f"{d.importer} imports {d.imported} via {sorted(r.heads for r in d.routes)}" for d in illegal)
    assert not found, "\n".join(found)


def test_no_import_cycles(graph):
    deps = {module: graph.find_modules_directly_imported_by(module) for module in graph.modules}
    try:
        list(graphlib.TopologicalSorter(deps).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")


def test_layers_cover_every_subpackage():
    root = Path(nl_rewrite.__file__).parent
    subpackages = {p.parent.name for p in root.glob("*/__init__.py")}
    assert subpackages == set(LAYERS)


def _private_reaches(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nl_rewrite"):
            found += [f"{path.name}:{node.lineno} imports {alias.name}" for alias in node.names
                      if alias.name.startswith("_") and not alias.name.startswith("__")]
        elif isinstance(node, ast.Attribute) and _is_private(node.attr):
            owner = node.value
            if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                found.append(f"{path.name}:{node.lineno} reaches .{node.attr} of {ast.unparse(owner)}")
    return found


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name not in PUBLIC_UNDERSCORE


def test_no_module_reaches_into_private_members():
    root = Path(nl_rewrite.__file__).parent
    found = [hit for path in sorted(root.rglob("*.py")) for hit in _private_reaches(path)]
    assert not found, "\n".join(found)


CLI_LIBRARY_MODULES = {"simple_parsing", "simple_parsing.docstring"}
"""What the CLI may import of its library: the package's top-level names and the attribute-docstring reader."""


def test_only_the_cli_uses_the_cli_library_and_only_its_public_api():
    """The configs (coders, stages, the run) import nothing of the CLI library, and the CLI imports none of its
    internals (issue 25: simple_parsing's private names had pinned it below 0.2)."""
    root = Path(nl_rewrite.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        in_cli = path.parent.name == "cli"
        for node in ast.walk(tree):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                       [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for module in (m for m in modules if m.split(".")[0] == "simple_parsing"):
                if not in_cli or module not in CLI_LIBRARY_MODULES:
                    found.append(f"{path.relative_to(root)}:{node.lineno} imports {module}")
            if in_cli and isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id == "self" and _is_private(node.attr):
                found.append(f"{path.relative_to(root)}:{node.lineno} uses self.{node.attr} (a base class's private)")
    assert not found, "\n".join(found)


def test_the_run_reads_as_its_chain():
    """The run's one module stays short and ``run_experiment`` reads as the chain of stages (issue 25: at most 300
    lines and 40 lines); a stage that grows goes into a function of its own."""
    from nl_rewrite.pipeline import experiment

    path = Path(experiment.__file__)
    source = path.read_text()
    tree = ast.parse(source)
    run = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run_experiment")
    assert len(source.splitlines()) <= 300, f"{path.name} has {len(source.splitlines())} lines (at most 300)"
    assert run.end_lineno - run.lineno + 1 <= 40, f"run_experiment has {run.end_lineno - run.lineno + 1} lines"
