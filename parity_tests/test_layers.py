"""The layering of the code: base <- models <- application <- scripts, with no import cycle between files.

The import graph is read with `ast` from every file, imports deferred inside functions included, plus the
import paths the architecture specs name (`ArchSpec.flax_class`, `.torch_class`, `.fixtures`), which their
resolvers (`flax_model.registry`, `torch_reference.registry`, `scripts.make_fixtures`) import by name.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from convert.base.registry import SPECS

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("convert", "flax_model", "torch_reference", "scripts")

# The layer of a module is its folder: `convert/base/` (configs, checkpoint I/O, key tables, specs, registry, Hub
# resolution), `flax_model/` and `torch_reference/` (the models), `convert/` outside `base/` (the application:
# compose, the CLIs, Hub upload), `scripts/`. No list to keep: a new file is placed by where it is saved.
BASE, MODELS, APP, SCRIPTS = 0, 1, 2, 3
LAYER_NAMES = {BASE: "base", MODELS: "models", APP: "application", SCRIPTS: "scripts"}

# Files shared by every architecture must not name one; these are an architecture's own (and the registration).
ARCH_FILES = {"convert.base.registry"} | {f"convert.base.archs.{s.name}" for s in SPECS} | {s.flax_class.split(":")[0] for s in SPECS} | {
    s.torch_class.split(":")[0] for s in SPECS}


def module_files() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


MODULES = module_files()


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    if top == "scripts":
        return SCRIPTS
    if top in ("flax_model", "torch_reference"):
        return MODELS
    if module == "convert.base" or module.startswith("convert.base."):
        return BASE
    if top == "convert":
        return APP
    raise AssertionError(f"{module}: not in a folder of a known layer")


def _resolve(name: str) -> str | None:
    """The project module an import names (a submodule import `from a import b` names `a.b` when it exists)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    tree = ast.parse(MODULES[module].read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.rsplit(".", node.level)[0] if MODULES[module].name != "__init__.py" else module
                prefix = f"{base}.{node.module}" if node.module else base
            else:
                prefix = node.module or ""
            names = [f"{prefix}.{alias.name}" for alias in node.names] + [prefix]
        else:
            continue
        for name in names:
            target = _resolve(name)
            if target is not None and target != module:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    graph = {m: imports_of(m) for m in MODULES}
    # The resolvers import what the specs name, by string.
    for spec in SPECS:
        graph["flax_model.registry"].add(spec.flax_class.split(":")[0])
        graph["torch_reference.registry"].add(spec.torch_class.split(":")[0])
        graph["scripts.make_fixtures"].add(spec.fixtures)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one file (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_file_imports_a_layer_above_its_own():
    bad = [f"{src} ({LAYER_NAMES[layer_of(src)]}) imports {dst} ({LAYER_NAMES[layer_of(dst)]})"
           for src, targets in import_graph().items() for dst in targets if layer_of(dst) > layer_of(src)]
    assert not bad, "; ".join(sorted(bad))


def test_the_graph_walk_sees_deferred_imports():
    # convert.compose imports the Flax model inside a function: the walk must find that edge.
    assert "flax_model.speech_encoder_decoder" in imports_of("convert.compose")
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


_ARCH_WORD = re.compile(r"(?<![A-Za-z0-9])(wav2vec2|w2v|bart|mbart|gpt-?2)(?![A-Za-z0-9])", re.IGNORECASE)


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer_of(m) in (BASE, MODELS, APP)
                                          and m not in ARCH_FILES and not m.startswith("convert.base.archs")))
def test_shared_code_names_no_architecture(module):
    """Shared code talks to the encoder and decoder protocols; only spec, model and fixture files name one."""
    tree = ast.parse(MODULES[module].read_text())
    docstrings = _docstrings(tree)
    words = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.append(node.id)
        elif isinstance(node, ast.Attribute):
            words.append(node.attr)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            words.extend([getattr(node, "module", None) or "", *(a.name for a in node.names)])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words.append(node.value)
    named = sorted({m.group(0) for w in words for part in re.split(r"[_.]", w) for m in _ARCH_WORD.finditer(part)})
    assert not named, f"{MODULES[module].relative_to(ROOT)} names {', '.join(named)} in code"
