"""The package's shape: no library file over 350 lines, no import circle among padim's modules, the
folders in layers (docs/ARCHITECTURE.md, "Layers"): a module imports only from its own folder or a
folder below it, imports inside functions included (a circle hidden in a function is still a
circle); optional extras and torch only in the folders whose layer owns them; and the public
imports users have keep working.

The import graph is read from the source with ``ast`` (an independent reading: nothing of padim is
imported to build it) and its circles found with Tarjan's strongly connected components.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

PACKAGE = Path(__file__).resolve().parent.parent / "padim"
MAX_LINES = 350


def _modules() -> Dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(path: Path, name: str, modules: Dict[str, Path]) -> Set[str]:
    """padim modules ``name`` imports anywhere in its file (a package's submodule when one is named)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                candidate = f"{module}.{alias.name}"
                targets.add(candidate if candidate in modules else module)
    return {t for t in targets if t in modules and t != name}


def _circles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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


def test_no_library_file_is_longer_than_350_lines():
    long = {str(path.relative_to(PACKAGE.parent)): n for path in PACKAGE.rglob("*.py")
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_no_import_circle_among_padim_modules():
    modules = _modules()
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    assert not _circles(graph), f"import circles: {_circles(graph)}"


def test_the_circle_finder_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


# docs/ARCHITECTURE.md's order, bottom first: a folder may import itself and the folders before it.
# errors and version are leaf modules every layer may read; the package itself, runtime and __main__
# are the top (they gather the public names).
LAYERS = ["settings", "files", "data", "pipeline", "monitor", "core", "deploy", "render", "cluster", "jobs",
          "serve", "cli"]
LEAVES = {"padim.errors", "padim.version"}
TOP = {"padim", "padim.runtime", "padim.__main__"}
# third-party packages that only some layers may import (an extra, or torch where the layer is torch-free)
ONLY_IN = {"ray": {"cluster", "jobs", "cli"}, "pyarrow": {"cluster"}, "fastapi": {"serve"}, "uvicorn": {"serve"},
           "starlette": {"serve"}, "prometheus_client": {"serve"}, "onnx": {"deploy"}, "onnxruntime": {"deploy"},
           "openvino": {"deploy"}, "nncf": {"deploy"}, "onnxscript": {"deploy"}}
TORCH_FREE = {"settings", "pipeline", "monitor"}
TORCH_FREE_MODULES = {"padim.deploy.exported", "padim.deploy.export_folder", "padim.deploy.sessions",
                      "padim.runtime", "padim.files.headers", "padim.files.atomic", "padim.files.digests"}


def _layer(module: str):
    """A module's layer index (None for the leaves, len(LAYERS) for the top)."""
    if module in LEAVES:
        return None
    if module in TOP:
        return len(LAYERS)
    return LAYERS.index(module.split(".")[1])


def _third_party(path: Path, module_level: bool = False) -> Set[str]:
    """Top-level names of the packages ``path`` imports (only its module-level statements with
    ``module_level``: what importing it loads)."""
    found = set()
    tree = ast.parse(path.read_text(), str(path))
    for node in (tree.body if module_level else ast.walk(tree)):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


def upward_imports(graph: Dict[str, Set[str]]) -> List[str]:
    """'a -> b' for every import of a module in a higher layer than the importer's."""
    found = []
    for name, targets in sorted(graph.items()):
        for target in sorted(targets):
            own, theirs = _layer(name), _layer(target)
            if theirs is not None and (own is None or theirs > own):
                found.append(f"{name} -> {target}")
    return found


def test_every_folder_has_a_layer():
    folders = {path.name for path in PACKAGE.iterdir() if (path / "__init__.py").exists()}
    assert folders == set(LAYERS), f"folders without a layer, or layers without a folder: {folders ^ set(LAYERS)}"


def test_no_folder_imports_a_folder_above_it():
    modules = _modules()
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    assert not upward_imports(graph), f"imports that go up the layers: {upward_imports(graph)}"


def test_the_layer_check_finds_an_upward_import():
    graph = {"padim.files.images": {"padim.core.maps"}, "padim.core.maps": {"padim.settings.config"},
             "padim.errors": {"padim.files.images"}}
    assert upward_imports(graph) == ["padim.errors -> padim.files.images", "padim.files.images -> padim.core.maps"]


def test_extras_and_torch_only_where_their_layer_is():
    """An extra is imported only in its layer (anywhere in the file); a torch-free module does not load
    torch when imported (settings asks torch about a GPU inside a function, only when one is named)."""
    wrong = []
    for name, path in sorted(_modules().items()):
        layer = name.split(".")[1] if name.count(".") else ""
        used = _third_party(path)
        wrong += [f"{name} imports {package}" for package in sorted(used) if package in ONLY_IN
                  and layer not in ONLY_IN[package]]
        if "torch" in _third_party(path, module_level=True) and (layer in TORCH_FREE or name in TORCH_FREE_MODULES):
            wrong.append(f"{name} imports torch")
    assert not wrong, wrong


def test_public_imports_keep_working():
    from padim import PaDiM, PadimResult  # noqa: F401
    from padim.data import find_category  # noqa: F401
    from padim.runtime import ExportedModel  # noqa: F401

    assert callable(find_category) and PaDiM().backbone == "resnet18"
