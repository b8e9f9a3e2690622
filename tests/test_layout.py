"""The package's shape stays what the README's Design section promises (issue 16): small functions and files, no
import cycles (lazy imports inside functions count), layers that only import downwards, and a lean
``import lora_kernels``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "lora_kernels"
MAX_FUNC, MAX_KERNEL, MAX_FILE = 120, 200, 500

# Layers, lowest first: a module may import its own layer and those below, never one above.
LAYERS = [
    ("lora_kernels.backends", "lora_kernels.functional", "lora_kernels.testing", "lora_kernels.quant"),
    ("lora_kernels.nn",),
    ("lora_kernels.adapters",),
    ("lora_kernels.models",),
    ("lora_kernels.training",),
    ("lora_kernels.cli", "lora_kernels.__main__", "lora_kernels"),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every lora_kernels module ``name`` imports, at top level or inside functions."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = base[: len(base) - node.level + 1]
                mod = ".".join(pkg + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # `import a.b.c` names a.b.c; a name from a module is the module
                t = t.rpartition(".")[0]
            if t.startswith("lora_kernels") and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {n: _imports(n, p, modules) for n, p in modules.items()}


def test_no_function_or_file_too_long():
    too_long = []
    for path in PKG.rglob("*.py"):
        src = path.read_text()
        if src.count("\n") > MAX_FILE:
            too_long.append(f"{path.relative_to(ROOT)}: {src.count(chr(10))} lines > {MAX_FILE}")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                jit = any("jit" in ast.unparse(d) for d in node.decorator_list)
                n = node.end_lineno - node.lineno + 1
                if n > (MAX_KERNEL if jit else MAX_FUNC):
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not too_long, "\n".join(too_long)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert not _cycles(_graph())


def test_cycle_finder_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _layer(mod: str) -> int:
    best = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    assert best is not None, f"{mod} is in no layer of tests/test_layout.py"
    return best[0]


def test_layers_import_only_downwards():
    upward = [
        f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
        for m, targets in _graph().items()
        for t in targets
        if _layer(t) > _layer(m)
    ]
    assert not upward, "\n".join(upward)


def test_registry_imports_no_backend():
    """The backend interface and registry modules name no backend package at import time or lazily, except
    ``builtin`` (the built-ins' entries, whose imports are lazy inside their functions)."""
    graph = _graph()
    for mod in ("lora_kernels.backends.base", "lora_kernels.backends.registry", "lora_kernels.backends.heuristics"):
        bad = {t for t in graph[mod] if t.startswith(("lora_kernels.backends.torch", "lora_kernels.backends.triton",
                                                      "lora_kernels.backends.cuda"))}  # fmt: skip
        assert not bad, (mod, bad)


@pytest.mark.parametrize("name", ["lora_kernels", "lora_kernels.nn", "lora_kernels.adapters", "lora_kernels.models"])
def test_lean_import(name):
    code = (
        f"import sys, {name}; heavy = [m for m in ('triton', 'transformers', 'peft', 'bitsandbytes', 'lora_kernels._C', "
        "'lora_kernels._cpu') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
