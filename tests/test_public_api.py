"""The public face: what ``nl_rewrite`` and its subpackages export exists, importing them stays cheap, and every
import, dotted name and module path that README.md and docs/*.md show still resolves after the reorganisation.

(tests/test_docs.py runs the custom-replacement example of docs/replacements.md; this file only checks names.)
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import nl_rewrite

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "nl_rewrite"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SUBPACKAGES = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
WITH_EXPORTS = [name for name in SUBPACKAGES if name != "cli"]

PROMISED = {  # what the README and docs/architecture.md promise at the top level
    "load_model", "tiny_model", "Site", "token_windows", "TokenWindows", "SparseCoder", "CoderConfig", "load_coder",
    "save_coder", "LatentCache", "Replacement", "ZeroReplacement", "IdentityReplacement", "MeanReplacement",
    "TranscoderReplacement", "SAEReplacement", "ZeroLatentsReplacement", "RandomLatentsReplacement",
    "OracleReplacement", "NLSimulatorReplacement", "LiveSimulatorReplacement", "Simulator", "LexicalSimulator",
    "LinearCalibrator", "QuantileCalibrator", "IsotonicCalibrator", "make_calibrator", "Evaluator", "EvalResults",
    "make_backend", "EmbeddedBackend", "OpenAIBackend", "SGLangBackend", "CachedBackend", "ChatRequest",
    "ScoreRequest", "NLRewriteError", "LLMError",
}


# ---- exports ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("package", ["nl_rewrite", *(f"nl_rewrite.{name}" for name in WITH_EXPORTS)])
def test_everything_in_all_exists(package):
    module = importlib.import_module(package)
    names = module.__all__
    assert names and len(names) == len(set(names)), "__all__ must be non-empty and without repeats"
    missing = [name for name in names if getattr(module, name, None) is None]
    assert not missing, f"{package}.__all__ names what it cannot provide: {missing}"
    assert set(names) <= set(dir(module))
    star: dict = {}
    exec(f"from {package} import *", star)
    assert set(names) <= set(star)


def test_the_promised_names_are_exported_from_the_top():
    assert PROMISED <= set(nl_rewrite.__all__), sorted(PROMISED - set(nl_rewrite.__all__))
    from nl_rewrite.coders import load_coder
    from nl_rewrite.coders.checkpoint import load_coder as defined

    assert nl_rewrite.load_coder is load_coder is defined


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'Evalutor'"):
        nl_rewrite.Evalutor  # noqa: B018
    with pytest.raises(ImportError):
        exec("from nl_rewrite.llm import OpenAIBackends", {})


def test_type_checking_imports_match_the_lazy_exports():
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    declared = {alias.name: node.module for node in block.body if isinstance(node, ast.ImportFrom)
                for alias in node.names}
    assert declared == nl_rewrite._EXPORTS


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_every_subpackage_says_what_it_owns(name):
    doc = importlib.import_module(f"nl_rewrite.{name}").__doc__ or ""
    assert len(doc.split()) >= 25, f"nl_rewrite.{name} needs a docstring saying what it owns"


def test_importing_the_package_loads_no_model_and_no_heavy_library():
    code = ("import sys, nl_rewrite, " + ", ".join(f"nl_rewrite.{name}" for name in SUBPACKAGES) + "\n"
            "heavy = ('torch', 'transformer_lens', 'transformers', 'openai', 'scipy')\n"
            "print(sorted(m for m in heavy if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---- what the docs show -------------------------------------------------------------------------------------------

def _code_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, code) of every fenced block, any language."""
    return [(text[:m.start(1)].count("\n") + 1, m.group(1)) for m in re.finditer(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)]


def _imports_in(code: str) -> list[tuple[int, str]]:
    """(line offset, source) of each ``import nl_rewrite...`` / ``from nl_rewrite... import`` statement in ``code``.

    A block that parses as Python is read with ast; pseudo-code blocks (signatures, diagrams) are scanned line by line,
    joining a parenthesised import that spans several lines."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        lines, found, i = code.splitlines(), [], 0
        while i < len(lines):
            if re.match(r"\s*(from|import)\s+nl_rewrite\b", lines[i]):
                start, stmt = i, lines[i].split("#")[0].strip()
                while stmt.count("(") > stmt.count(")") and i + 1 < len(lines):
                    i += 1
                    stmt += " " + lines[i].split("#")[0].strip()
                found.append((start, stmt))
            i += 1
        return found
    return [(node.lineno - 1, ast.get_source_segment(code, node)) for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom)) and _names_nl_rewrite(node)]


def _names_nl_rewrite(node: ast.Import | ast.ImportFrom) -> bool:
    if isinstance(node, ast.ImportFrom):
        return (node.module or "").split(".")[0] == "nl_rewrite"
    return any(alias.name.split(".")[0] == "nl_rewrite" for alias in node.names)


def _doc_imports() -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        text = path.read_text()
        for first, code in _code_blocks(text):
            found += [(f"{path.name}:{first + offset}", stmt) for offset, stmt in _imports_in(code)]
        for m in re.finditer(r"`((?:from|import) nl_rewrite[^`]*)`", text):  # inline code spans
            found.append((f"{path.name}:{text[:m.start()].count(chr(10)) + 1}", m.group(1)))
    return found


DOC_IMPORTS = _doc_imports()


def test_the_docs_show_imports_at_all():
    files = {where.split(":")[0] for where, _ in DOC_IMPORTS}
    assert len(DOC_IMPORTS) >= 2 and {"README.md", "replacements.md"} <= files


@pytest.mark.parametrize("where,statement", DOC_IMPORTS, ids=[f"{w} {s}" for w, s in DOC_IMPORTS])
def test_every_import_in_the_docs_resolves(where, statement):
    try:
        exec(compile(statement, where, "exec"), {})
    except ImportError as exc:
        pytest.fail(f"{where}: `{statement}` no longer resolves: {exc}")


def _resolve_dotted(dotted: str) -> object:
    """``nl_rewrite.a.b.Name.attr`` → the object: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


DOTTED = sorted({(path.name, m.group(0)) for path in DOCS
                 for m in re.finditer(r"\bnl_rewrite(?:\.[A-Za-z_]\w*)+", path.read_text())})


@pytest.mark.parametrize("doc,dotted", DOTTED, ids=[f"{d} {n}" for d, n in DOTTED])
def test_every_dotted_name_in_the_docs_resolves(doc, dotted):
    try:
        _resolve_dotted(dotted.rstrip("."))
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"{doc} names `{dotted}`, which does not resolve: {exc}")


def _module_paths() -> list[tuple[str, str]]:
    """``nl_rewrite/x.py`` and ``<subpackage>/x.py`` paths the docs mention."""
    subpackages = "|".join(SUBPACKAGES)
    pattern = re.compile(rf"(?<![\w/])(nl_rewrite/(?:\w+/)*\w+\.py|(?:{subpackages})/\w+\.py)\b")
    return sorted({(path.name, m.group(1)) for path in DOCS for m in pattern.finditer(path.read_text())})


MODULE_PATHS = _module_paths()


@pytest.mark.parametrize("doc,module_path", MODULE_PATHS, ids=[f"{d} {p}" for d, p in MODULE_PATHS])
def test_every_module_path_in_the_docs_exists(doc, module_path):
    relative = module_path.removeprefix("nl_rewrite/")
    assert (PACKAGE / relative).is_file(), f"{doc} mentions {module_path}, which does not exist"
