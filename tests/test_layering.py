"""The package's shape: imports between branchfold modules go one way, and private names stay private.

Read with ``ast`` from the source files, so imports inside functions (the lazy ones that hide a circle
from the interpreter) and imports under ``if TYPE_CHECKING:`` (a circle for the reader and the type
checker) count as much as those at the top of a module. Every module of the package has a layer, and
no module reads a private attribute (``obj._x``) of anything but itself, its own classes and ATen's op
namespace; private torch APIs live in ``branchfold/compat.py`` alone.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "branchfold"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def modules_under(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package in ``package_dir``."""
    found = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES: dict[str, Path] = modules_under(ROOT)


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


@dataclass(frozen=True)
class Import:
    module: str  # the branchfold module the import loads
    line: int


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(tree: ast.AST, type_checking: bool = True):
    """Every node of ``tree``; without what sits under ``if TYPE_CHECKING:`` unless ``type_checking``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if not type_checking and isinstance(node, ast.If) and _type_checking_only(node):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if _is_package(module) else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imports_of(module: str) -> list[Import]:
    """The branchfold modules ``module`` imports, wherever in the file the import statement is."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    found: list[Import] = []
    for node in _walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(a.name, node.lineno) for a in node.names if a.name in MODULES]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node)
            if base not in MODULES:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"  # ``from branchfold.passes import verify``: the submodule
                found.append(Import(sub if sub in MODULES else base, node.lineno))
    return sorted(set(found), key=lambda i: (i.line, i.module))


def _graph() -> dict[str, set[str]]:
    return {m: {i.module for i in imports_of(m) if i.module != m} for m in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a closed path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_package_is_found():
    assert f"{PACKAGE}.rewriter.affine" in MODULES and f"{PACKAGE}.cli" in MODULES


def test_no_import_cycle_between_modules():
    cycle = find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_render_depends_on_nothing_the_report_needs():
    """The report reaches its renderer, never the reverse: render.py formats plain data."""
    assert f"{PACKAGE}.report" not in {i.module for i in imports_of(f"{PACKAGE}.render")}


def _outside_private_module(module: str, imported: str) -> bool:
    """Whether ``imported`` lies under a private module or package (``zoo._common``) that ``module`` is not in."""
    parts = imported.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            parent = ".".join(parts[:i])
            return not (module == parent or module.startswith(parent + "."))
    return False


def _private_uses(module: str) -> list[str]:
    """``from m import _x`` and ``m._x`` where ``m`` is another branchfold module, and imports of a private
    module (``pkg._impl``) from outside its package."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    found = [
        (i.line, f"imports {i.module}")
        for i in imports_of(module)
        if _outside_private_module(module, i.module)
    ]
    aliases: dict[str, str] = {}  # local name -> branchfold module it is bound to
    for node in _walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = _absolute(module, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:
                    aliases[alias.asname or alias.name] = sub
                elif base in MODULES and base != module and alias.name.startswith("_"):
                    found.append((node.lineno, f"from {base} import {alias.name}"))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES and alias.asname:
                    aliases[alias.asname] = alias.name
    for node in _walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            if isinstance(base, ast.Name) and aliases.get(base.id, module) != module:
                found.append((node.lineno, f"{base.id}.{node.attr} ({aliases[base.id]})"))
    return [f"line {line}: {what}" for line, what in sorted(found)]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_name_taken_from_another_module(module):
    assert _private_uses(module) == []


# The checks above must be able to fail: they are run on small made-up graphs and sources too.


def test_find_cycle_sees_a_cycle_and_its_absence():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_lazy_imports_and_type_checking_imports_count(tmp_path, monkeypatch):
    pkg = tmp_path / PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from branchfold.b import B\n"
        "def f():\n    from branchfold import b\n    return b._hidden\n"
    )
    (pkg / "b.py").write_text(
        "from branchfold.a import f\nfrom branchfold.a import _g\nfrom branchfold.sub._impl import h\n"
    )
    (pkg / "sub").mkdir()
    (pkg / "sub" / "__init__.py").write_text("from branchfold.sub._impl import h\n")
    (pkg / "sub" / "_impl.py").write_text("h = 1\n")
    monkeypatch.setitem(globals(), "MODULES", modules_under(pkg))
    assert [i.module for i in imports_of("branchfold.a")] == ["branchfold.b", "branchfold.b"]  # type-only, lazy
    assert [i.line for i in imports_of("branchfold.a")] == [3, 5]
    assert find_cycle(_graph()) == ["branchfold.a", "branchfold.b", "branchfold.a"]
    assert _private_uses("branchfold.a") == ["line 6: b._hidden (branchfold.b)"]
    assert _private_uses("branchfold.b") == [
        "line 2: from branchfold.a import _g",
        "line 3: imports branchfold.sub._impl",
    ]
    assert _private_uses("branchfold.sub") == []  # a package may use its own private modules


# The folders, bottom to top: a module may import its own folder and those below it, never one above.
LAYERS = ["rewriter", "patterns", "adapters", "passes"]


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_folders_import_one_way():
    upward = []
    for module in MODULES:
        mine = _layer(module)
        if mine is None:
            continue
        for imp in imports_of(module):
            theirs = _layer(imp.module)
            if theirs is not None and theirs > mine:
                upward.append(f"{module}:{imp.line} imports {imp.module} ({LAYERS[theirs]} is above {LAYERS[mine]})")
    assert not upward, "\n".join(upward)


# Every module of the package, bottom to top: a module may import its own level and those below it.
LEVELS = [
    ("base", ("compat", "errors", "render", "render_svg", "render_html_assets", "stages", "timing",
              )),  # import nothing of ours
    ("algebra", ("rewriter",)),
    ("storage", ("storage",)),  # the ONNX storage layer (onnx_wire imports nothing of ours)
    ("recognizers", ("patterns",)),
    ("adapters", ("adapters",)),
    ("report", ("report", "report_data", "render_html")),
    ("front ends", ("passes", "training", "zoo")),
    ("entry points", ("api", "cli", "demo", "__main__", "")),
]


def level_of(module: str) -> int | None:
    rest = module.split(".", 1)[1] if "." in module else ""
    top = rest.split(".")[0]
    for i, (_, names) in enumerate(LEVELS):
        if top in names:
            return i
    return None


def test_every_module_has_a_level():
    assert [m for m in MODULES if level_of(m) is None] == []


def test_no_module_imports_a_level_above_its_own():
    upward = []
    for module in MODULES:
        mine = level_of(module)
        for imp in imports_of(module):
            theirs = level_of(imp.module)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{module}:{imp.line} imports {imp.module} ({LEVELS[theirs][0]} is above {LEVELS[mine][0]})")
    assert not upward, "\n".join(upward)


def test_the_base_level_imports_nothing_of_ours():
    for module in MODULES:
        if level_of(module) == 0:
            assert imports_of(module) == [], module


# Attribute access ``obj._x`` on anything but ``self``, ``cls``, the module's own classes, ``super()`` (a
# subclass overriding its base) and ATen's op namespace (``aten._to_copy`` is an op's name).
COMPAT = f"{PACKAGE}.compat"
OP_NAMESPACES = {"aten"}
# Known exceptions, each with its reason.
ALLOWED = {
    (f"{PACKAGE}.storage.onnx_weights", "session._branchfold_values"): "our own attribute, set on an onnxruntime session",
}


def private_attribute_reads(module: str, source: str | None = None) -> list[str]:
    tree = ast.parse(source if source is not None else MODULES[module].read_text())
    own = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)} | {"self", "cls"} | OP_NAMESPACES
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
            continue
        base = node.value
        if isinstance(base, ast.Name) and base.id in own:
            continue
        if isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "super":
            continue
        text = ast.unparse(node)
        if (module, text) not in ALLOWED:
            found.append(f"line {node.lineno}: {text}")
    return found


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != COMPAT))
def test_no_private_attribute_of_another_object(module):
    assert private_attribute_reads(module) == []


def test_the_private_attribute_check_can_fail():
    source = (
        "import torch\nclass Own:\n    def f(self, other):\n        return self._a, Own._b, other._c\n"
        "def g(x):\n    return torch._C._nn, aten._to_copy, super()._evaluate\n"
    )
    assert sorted(private_attribute_reads("branchfold.x", source)) == [
        "line 4: other._c", "line 6: torch._C", "line 6: torch._C._nn",
    ]
