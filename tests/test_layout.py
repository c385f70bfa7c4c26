"""The engine's layout keeps its seam: every engine module imports on its own in a fresh interpreter and
loads no proxy module, no engine module names the proxy, the engine's module graph has no cycle, and the
only imports inside functions are the heavy ML libraries loaded on first use.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "engine"
# Imported inside functions, on first use: each takes from a second to many seconds to import (torch, the
# libraries built on it, scikit-learn and the boosting libraries' native code, Hugging Face datasets).
LAZY = frozenset(
    {
        "torch", "transformers", "sentence_transformers", "sklearn", "xgboost", "lightgbm", "catboost", "datasets",
        "huggingface_hub", "langchain_text_splitters", "skops", "nltk",
    }
)  # fmt: skip
# Project modules that exist to hold optional heavy imports, imported only when configured to be used.
LAZY_MODULES = frozenset({"engine.nlp.onnx_embed"})  # ONNX Runtime and onnxscript: the onnx extra


def _name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(path): path for path in sorted(ENGINE.rglob("*.py"))}


def _imports(tree: ast.Module) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement of a module, and whether it sits inside a function."""
    found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []

    def visit(node: ast.AST, inside: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                found.append((child, inside))
            visit(child, inside or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))

    visit(tree, False)
    return found


def _targets(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules an import statement loads (``from engine.pg import text``: ``engine.pg.text``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def _parsed() -> dict[str, list[tuple[ast.Import | ast.ImportFrom, bool]]]:
    return {name: _imports(ast.parse(path.read_text(), str(path))) for name, path in MODULES.items()}


def test_no_engine_module_names_the_proxy() -> None:
    named = [
        f"{module}:{node.lineno}"
        for module, imports in _parsed().items()
        for node, _ in imports
        for target in _targets(node)
        if target == "proxy" or target.startswith("proxy.")
    ]
    assert named == []


def test_function_local_imports_are_lazy_ml_libraries_only() -> None:
    local = [
        f"{module}:{node.lineno} {target}"
        for module, imports in _parsed().items()
        for node, inside in imports
        if inside
        for target in _targets(node)
        if target.split(".")[0] not in LAZY and target not in LAZY_MODULES
    ]
    assert local == []


def test_the_engine_module_graph_is_acyclic() -> None:
    graph = {
        module: sorted({t for node, inside in imports if not inside for t in _targets(node) if t in MODULES} - {module})
        for module, imports in _parsed().items()
    }
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(module) :], module]))
        if module in done:
            return
        path.append(module)
        for target in graph[module]:
            visit(target)
        path.pop()
        done.add(module)

    for module in graph:
        visit(module)


def _import_alone(module: str) -> str | None:
    """None when ``module`` imports in a fresh interpreter and loads no proxy module; else what went wrong."""
    code = (
        f"import sys\nimport {module}\n"
        "loaded = sorted(m for m in sys.modules if m == 'proxy' or m.startswith('proxy.'))\n"
        "sys.exit(f'loads {loaded}' if loaded else 0)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    if result.returncode == 0:
        return None
    return f"{module}: {(result.stderr.strip().splitlines() or ['exit ' + str(result.returncode)])[-1]}"


def test_every_engine_module_imports_alone_without_the_proxy() -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        failures = [failure for failure in pool.map(_import_alone, MODULES) if failure is not None]
    assert failures == []
