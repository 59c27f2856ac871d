"""The package's layout holds: no import cycles, imports run down the layers, small modules, and
imports of our own modules inside functions only where they buy start-up time.

The layers (docs/architecture.md), lowest first; a module may import its own layer and the ones
below, never one above, and the method folders of one layer (sliders/, picasso/) not each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "conceptkit"
MAX_LINES = 400

# module (or folder) -> layer; the longest matching prefix wins
LAYERS = {
    # 0: foundations: errors, files, the store, maths, pictures; the toy world and its trainer
    "conceptkit": 0, "errors": 0, "jsondata": 0, "ui": 0, "capacity": 0, "outputs": 0, "store": 0, "store_schema": 0,
    "store_admin": 0, "tensor_files": 0, "harvest_shards": 0, "prompts": 0, "tokenizer": 0, "metrics": 0,
    "figures": 0, "image_folder": 0, "infotext": 0, "parallel": 0, "settings": 0, "toy": 0,
    # 1: loading models
    "models": 1,
    # 2: the model-side steps and what every method reads
    "diffusion": 2, "diffusion_flow": 2, "features": 2, "step_recorder": 2, "harvest": 2, "toy.edits": 2,
    # 3: the methods
    "sliders": 3, "picasso": 3, "implant": 3,
    # 4: using them
    "generate": 4, "evaluate": 4,
    # 5: the command line
    "cli": 5, "__main__": 6,
}
METHOD_FOLDERS = ("sliders", "picasso", "implant")


def _modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


MODULES = _modules()


def _resolve(dotted: str) -> str | None:
    """Our module that `conceptkit.a.b.c` names (a module, or a name inside one)."""
    rel = dotted.split(".")[1:]
    while rel and ".".join(rel) not in MODULES:
        rel = rel[:-1]
    return ".".join(rel) if rel else ""


def _imports(name: str, path: Path) -> list[tuple[str, ast.AST, bool]]:
    """(our module imported, the node, whether inside a function) for every import of our modules."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)}
    out = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.startswith("conceptkit")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".") if package else []
                up = up[:len(up) - node.level + 1]
                base = ".".join(["conceptkit", *up, *([node.module] if node.module else [])])
            if base.startswith("conceptkit"):
                for a in node.names:  # `from pkg import submodule` depends on the submodule alone
                    sub = _resolve(f"{base}.{a.name}")
                    targets.append(f"{base}.{a.name}" if sub and sub != _resolve(base) else base)
        for t in targets:
            dep = _resolve(t)
            if dep is not None and dep != name:
                out.append((dep, node, id(node) in inner))
    return out


GRAPH = {name: sorted({d for d, _, _ in _imports(name, path)}) for name, path in MODULES.items()}


def _layer(name: str) -> int:
    parts = name.split(".") if name else ["conceptkit"]
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    raise AssertionError(f"module {name!r} has no layer in tests/test_layout.py; add it (and to docs/architecture.md)")


def test_every_module_has_a_layer():
    for name in MODULES:
        _layer(name)


def test_no_import_cycles():
    # Tarjan's strongly connected components, iteratively
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def connect(v):
        work = [(v, iter(GRAPH[v]))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        while work:
            node, edges = work[-1]
            for w in edges:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(GRAPH[w])))
                    break
                if w in on:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            connect(v)
    assert not found, f"import cycles: {found}"


def test_imports_run_down_the_layers():
    wrong = []
    for name, deps in GRAPH.items():
        for dep in deps:
            if _layer(dep) > _layer(name):
                wrong.append(f"{name} (layer {_layer(name)}) imports {dep} (layer {_layer(dep)})")
            top, dtop = name.split(".")[0], dep.split(".")[0]
            if top in METHOD_FOLDERS and dtop in METHOD_FOLDERS and top != dtop:
                wrong.append(f"{name} imports {dep}: the methods stay apart (share through a lower layer)")
    assert not wrong, "\n".join(wrong)


HEAVY = {"torch", "diffusers", "transformers", "matplotlib", "sklearn", "skfuzzy", "safetensors", "accelerate",
         "peft", "torchmetrics", "numpy", "scipy", "PIL", "huggingface_hub", "open_clip"}


def _heavy_at_top(path: Path) -> bool:
    """Does the module import a heavy library at its top level?"""
    for node in ast.parse(path.read_text()).body:
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
        if any(n.split(".")[0] in HEAVY for n in names):
            return True
    return False


def _top_level_deps(name: str) -> set[str]:
    return {d for d, _, inner in _imports(name, MODULES[name]) if not inner}


def _heavy(name: str, seen: set[str] | None = None) -> bool:
    """Does importing the module (and what it imports at its top, transitively) load a heavy library?"""
    seen = set() if seen is None else seen
    if name in seen:
        return False
    seen.add(name)
    parts = name.split(".") if name else []
    parents = [".".join(parts[:i]) for i in range(len(parts))]  # importing a.b runs a/__init__ first
    return _heavy_at_top(MODULES[name]) or any(_heavy(d, seen) for d in [*parents, *_top_level_deps(name)] if d in MODULES)


def test_imports_inside_functions_are_deferred_on_purpose():
    """A deferred import of our own modules buys start-up time (the module it defers loads torch or
    another heavy library) and says so on its line; cli/ defers the library so `conceptkit --help` stays fast."""
    wrong = []
    for name, path in MODULES.items():
        lines = path.read_text().splitlines()
        for dep, node, inner in _imports(name, path):
            if not inner:
                continue
            where = f"{path.relative_to(PACKAGE)}:{node.lineno}"
            if not _heavy(dep):
                wrong.append(f"{where} defers {dep}, which loads nothing heavy: import it at the top")
            elif "#" not in " ".join(lines[node.lineno - 1:node.end_lineno]):
                wrong.append(f"{where} defers {dep} without saying why on its line")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small(name):
    n = len(MODULES[name].read_text().splitlines())
    assert n <= MAX_LINES, f"{MODULES[name].relative_to(PACKAGE)} has {n} lines (at most {MAX_LINES}): split it by what it does"


def test_the_command_line_loads_no_torch():
    import subprocess
    import sys

    code = "import sys, conceptkit.cli; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"], "importing the CLI pulls in torch or diffusers: keep library imports inside the commands"
