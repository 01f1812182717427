"""The layering the code relies on: no import cycle in mgd3_core (lazy imports included),
no Dagster in the core, every module importable, modules and functions of a readable size."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MAX_MODULE_LINES = 410  # "about 400"
MAX_FUNCTION_LINES = 80  # body lines, docstring excluded


def _modules(package: str) -> dict[str, Path]:
    root = REPO / package
    out = {}
    for p in sorted(root.rglob("*.py")):
        parts = list(p.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Modules of ``known`` that ``module`` imports anywhere in its file (function bodies too)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_pkg else 0)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            # "from pkg import sub" imports the submodule when there is one.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != module}
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_of_the_core_has_no_cycle():
    mods = _modules("mgd3_core")
    graph = {m: _imports(m, p, set(mods)) for m, p in mods.items()}
    assert sum(len(v) for v in graph.values()) > 40  # the graph was really read
    assert graph["mgd3_core.evaluate"] >= {"mgd3_core.storage"}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_lazy_import_cycle(tmp_path):
    # The check above would pass vacuously if lazy imports were missed: pipeline <-> evaluate
    # was exactly such a cycle (a function-level import back into pipeline).
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from .pipeline import run_dir\n")
    assert _imports("mgd3_core.evaluate", src, {"mgd3_core.pipeline"}) == {"mgd3_core.pipeline"}


def test_the_core_does_not_import_dagster():
    offenders = [m for m, p in _modules("mgd3_core").items()
                 if any(n.split(".")[0] == "dagster"
                        for node in ast.walk(ast.parse(p.read_text()))
                        for n in ([a.name for a in node.names] if isinstance(node, ast.Import)
                                  else [node.module or ""] if isinstance(node, ast.ImportFrom) else []))]
    assert offenders == []


_IMPORT_ALL = """
import importlib, json, sys, traceback
failed, missing = {}, []
for name in sys.argv[1:]:
    try:
        module = importlib.import_module(name)
    except Exception:
        failed[name] = traceback.format_exc(limit=-3)
        continue
    missing += [f"{name}.{attr}" for attr in getattr(module, "__all__", ()) if not hasattr(module, attr)]
print(json.dumps({"failed": failed, "missing": missing, "dagster": "dagster" in sys.modules}))
"""


@pytest.mark.parametrize("package", ["mgd3_core", "mgd3_assets"])
def test_every_module_imports(package):
    """Every module imports in a fresh interpreter (not only after some other test imported its
    dependencies), every name its ``__all__`` exports exists, and importing all of mgd3_core at
    run time loads no Dagster module (the static check above misses a transitive import)."""
    modules = sorted(_modules(package))
    out = subprocess.run([sys.executable, "-c", _IMPORT_ALL, *modules], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["failed"] == {}
    assert result["missing"] == []
    assert len(modules) > 10
    if package == "mgd3_core":
        assert result["dagster"] is False
    else:
        assert result["dagster"] is True


@pytest.mark.parametrize("package", ["mgd3_core", "mgd3_assets"])
def test_modules_and_functions_stay_readable(package):
    too_long = []
    for module, path in _modules(package).items():
        src = path.read_text()
        if src.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{module}: {src.count(chr(10))} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body[1:] if ast.get_docstring(node) is not None and len(node.body) > 1 else node.body
                n = body[-1].end_lineno - body[0].lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"{module}.{node.name}: {n} body lines")
    assert too_long == []
