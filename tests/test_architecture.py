"""Arrows point one way: every module sits in a layer (a package) and imports only its
own layer and those below; no import loop inside a layer; the hook specifications
import none of the plugins they specify; storage never reaches the plugin manager;
the Python client imports nothing of the server; no module outgrows one job. The
rules name packages, not modules, so a new module is covered by where it is put.
Read from the source with ast (no third-party tool)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "barosync"
# The layers, bottom up (docs/architecture.md says what each holds).
LAYERS = ["domain", "wire", "formats", "hooks", "storage", "engine", "core", "calendars", "transports", "cli"]
# Outside the layers: what every layer may use (and which imports nothing of
# barosync), and what sits on top of everything (the public API, the entry point,
# the plugin author's test kit).
BASE = {"barosync.config", "barosync.buglog"}
TOP = {"barosync", "barosync.__main__", "barosync.testing"}
CLIENT = "barosync.client"  # the Python client: a library of its own
# Past this a file has two jobs (docs/architecture.md).
MAX_LINES = 500


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(("barosync", *path.relative_to(PACKAGE).with_suffix("").parts))
        found[name.removesuffix(".__init__")] = path
    return found


def imports() -> dict[str, set[str]]:
    """Every module's imports of other modules of the package (TYPE_CHECKING ones too:
    a loop in annotations is still a loop a reader has to untangle)."""
    mods = modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    module = f"{base}.{node.module}" if node.module else base
                else:
                    module = node.module or ""
                # `from .pkg import mod` is an import of pkg.mod, not of the package.
                named = [f"{module}.{alias.name}" for alias in node.names]
                targets = named if any(t in mods for t in named) else [module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target not in (name, "barosync"):
                    edges[name].add(target)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_loop_in_the_package() -> None:
    cycle = find_cycle(imports())
    assert cycle is None, "import loop: " + " -> ".join(cycle or [])


def layer(module: str) -> int | None:
    """Where ``module`` sits: -1 for BASE, len(LAYERS) for TOP, its layer's index, or
    None when it sits nowhere (a new top-level module must be given a layer)."""
    if module in BASE:
        return -1
    if module in TOP:
        return len(LAYERS)
    package = module.split(".")[1]
    return LAYERS.index(package) if package in LAYERS else None


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    found = []
    for module, deps in sorted(edges.items()):
        if module == CLIENT or module.startswith(CLIENT + "."):
            found += [f"{module} -> {dep} (the client imports nothing of the server)"
                      for dep in sorted(deps) if not dep.startswith(CLIENT)]
            continue
        here = layer(module)
        for dep in sorted(deps):
            there = layer(dep) if not dep.startswith(CLIENT) else len(LAYERS) - 1
            if here is not None and there is not None and there > here:
                found.append(f"{module} -> {dep}")
    return found


def test_every_module_sits_in_a_layer() -> None:
    homeless = [m for m in modules() if not m.startswith(CLIENT) and layer(m) is None]
    assert not homeless, f"put these in a layer package ({', '.join(LAYERS)}): {homeless}"


def test_arrows_point_down_the_layers() -> None:
    assert upward_imports(imports()) == []


def test_the_layer_check_notices_an_upward_import(tmp_path, monkeypatch) -> None:
    package = tmp_path / "barosync"
    for sub in ("core", "transports", "client"):
        (package / sub).mkdir(parents=True)
        (package / sub / "__init__.py").write_text("")
    (package / "transports" / "rest.py").write_text("")
    (package / "core" / "app.py").write_text("from ..transports import rest\n")
    (package / "client" / "c.py").write_text("from ..core import app\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", package)
    assert upward_imports(imports()) == [
        "barosync.client.c -> barosync.core.app (the client imports nothing of the server)",
        "barosync.core.app -> barosync.transports.rest",
    ]


def test_storage_never_reaches_the_plugin_manager() -> None:
    edges = imports()
    storage = [m for m in edges if m.startswith("barosync.storage.")]
    assert storage and not [m for m in storage if "barosync.hooks.plugins" in edges[m]]


def test_hook_specifications_import_no_plugin() -> None:
    allowed = {"barosync.config", "barosync.domain.models", "barosync.hooks.plugin_types"}
    assert imports()["barosync.hooks.hookspecs"] <= allowed
    assert not imports()["barosync.hooks.plugin_types"]


def test_no_module_has_two_jobs() -> None:
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split along the seam): {long}"


def private_imports() -> list[str]:
    """``from .module import _name``: a private name used in another module, i.e. two
    modules that are one job split in two (make the name public, or keep it home)."""
    found = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("barosync")):
                found += [f"{name}: {alias.name} from {node.module}" for alias in node.names
                          if alias.name.startswith("_") and not alias.name.startswith("__")]
    return found


def test_no_private_name_is_imported_across_modules() -> None:
    assert private_imports() == []


def test_the_private_import_check_notices_one(tmp_path, monkeypatch) -> None:
    package = tmp_path / "barosync"
    package.mkdir()
    (package / "a.py").write_text("_x = 1\n")
    (package / "b.py").write_text("from .a import _x\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", package)
    assert private_imports() == ["barosync.b: _x from a"]


def attribute_stubs() -> list[str]:
    """Classes that declare, under ``if TYPE_CHECKING:``, attributes some other class
    fills: a mixin sharing one ``self``, where a split should have made an interface."""
    found = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                for stmt in node.body:
                    if isinstance(stmt, ast.If) and getattr(stmt.test, "id", None) == "TYPE_CHECKING":
                        found.append(f"{name}.{node.name}")
    return found


def test_no_class_declares_attribute_stubs_for_another() -> None:
    assert attribute_stubs() == []


def test_the_stub_check_notices_one(tmp_path, monkeypatch) -> None:
    package = tmp_path / "barosync"
    package.mkdir()
    (package / "a.py").write_text("from typing import TYPE_CHECKING\n\nclass Half:\n    if TYPE_CHECKING:\n        app: int\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", package)
    assert attribute_stubs() == ["barosync.a.Half"]
