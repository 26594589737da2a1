"""The package's layers, read from the source: every import goes down (or stays in its layer), no two
modules import each other through any chain, and only the CLI handles argparse.

Layers, lowest first (DESIGN.md section 3): the top-level private helpers (``hizli/_log.py``,
``hizli/_startup.py``), kernels < models < data < train < export < serve = bench < api = config = run < cli.
``hizli/__init__.py`` is the lazy facade over all of them and is left out. Every ``import`` statement
counts, also those inside functions (a lazy import is still a dependency).

``KNOWN_*`` hold the violations that exist today, each with its reason; they are being removed and
the lists must only shrink. A violation not listed fails with the importer, the imported module and
the line; a listed one that no longer exists fails too, so the list is kept honest.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "hizli"

BOTTOM = 0  # hizli/_*.py: helpers every layer may use
LAYERS = {
    "kernels": 1,
    "models": 2,
    "data": 3,
    "train": 4,
    "export": 5,
    "serve": 6,
    "bench": 6,
    "api": 7,
    "config": 7,
    "run": 7,
    "cli": 8,
    "__main__": 8,
}
FACADE = "hizli"  # hizli/__init__.py

# (importer, imported) -> why it is still there. Upward imports.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}
# (importer, imported) -> why. Edges that close an import cycle; the cycle check leaves them out.
KNOWN_CYCLE_EDGES: dict[tuple[str, str], str] = {}
# module -> why. Library modules outside the CLI that import argparse or take an argparse Namespace
# (a parameter ``args`` without a concrete type that the function reads or passes on).
KNOWN_NAMESPACE: dict[str, str] = {}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int

    def where(self) -> str:
        path = MODULES[self.importer].relative_to(SRC.parent)
        return f"{path}:{self.line}: {self.importer} imports {self.imported}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts}


def layer(module: str) -> int:
    """The layer of ``hizli.<first part>...``; a module no layer names fails the test that asks."""
    first = module.split(".")[1]
    if first.startswith("_") and first != "__main__":
        return BOTTOM
    if first not in LAYERS:
        raise AssertionError(
            f"{module} is in no layer: add {first!r} to LAYERS in {Path(__file__).name} (and to DESIGN.md section 3)"
        )
    return LAYERS[first]


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` reads from (relative imports resolved against ``importer``)."""
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    if not MODULES[importer].name == "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str) -> list[Import]:
    """Every hizli module ``module`` imports, wherever the statement is, except under ``TYPE_CHECKING``
    (``from p import m`` counts as the module ``p.m`` when there is one, else as ``p``)."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    # ``if TYPE_CHECKING:`` imports never run: annotations only
    typing_only = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and getattr(block.test, "id", getattr(block.test, "attr", None)) == "TYPE_CHECKING"
        for n in ast.walk(block)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # import a.b.c of a name-only path: its closest module
                target = target.rpartition(".")[0]
            if target and target != module and target != FACADE and target.startswith("hizli"):
                found.append(Import(module, target, node.lineno))
    return found


LIBRARY = [m for m in MODULES if m != FACADE]
EDGES = sorted({i for m in LIBRARY for i in imports_of(m)}, key=lambda i: (i.importer, i.line, i.imported))


def test_every_module_has_a_layer():
    for module in LIBRARY:
        layer(module)


def test_imports_go_down_the_layers():
    upward = [i for i in EDGES if layer(i.imported) > layer(i.importer)]
    new = [i for i in upward if (i.importer, i.imported) not in KNOWN_UPWARD]
    assert not new, "upward imports (a module may import its own layer or those below):\n" + "\n".join(
        f"{i.where()} ({_layer_name(i.importer)} -> {_layer_name(i.imported)})" for i in new
    )
    gone = set(KNOWN_UPWARD) - {(i.importer, i.imported) for i in upward}
    assert not gone, f"fixed, so remove from KNOWN_UPWARD: {sorted(gone)}"


def _layer_name(module: str) -> str:
    first = module.split(".")[1]
    return first if first in LAYERS else "bottom"


def _cycles(edges: list[Import]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    graph: dict[str, set[str]] = {m: set() for m in LIBRARY}
    for e in edges:
        graph[e.importer].add(e.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_no_import_cycles():
    checked = [e for e in EDGES if (e.importer, e.imported) not in KNOWN_CYCLE_EDGES]
    cycles = _cycles(checked)
    assert not cycles, "import cycles (each group imports itself through these lines):\n" + "\n\n".join(
        "\n".join(e.where() for e in checked if e.importer in group and e.imported in group) for group in cycles
    )
    for edge in KNOWN_CYCLE_EDGES:
        present = [e for e in EDGES if (e.importer, e.imported) == edge]
        assert present, f"{edge} is gone: remove it from KNOWN_CYCLE_EDGES"
        assert _cycles(checked + present), f"{edge} no longer closes a cycle: remove it from KNOWN_CYCLE_EDGES"


def _uses(fn: ast.AST, name: str) -> bool:
    """Whether ``fn`` reads an attribute of ``name`` (``args.path``, ``getattr(args, "path")``) or passes
    ``name`` on to a call."""
    for n in ast.walk(fn):
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == name:
            return True
        if isinstance(n, ast.Call) and any(
            isinstance(a, ast.Name) and a.id == name for a in [*n.args, *(k.value for k in n.keywords)]
        ):
            return True
    return False


def _untyped_namespace_params(tree: ast.AST) -> list[tuple[str, int]]:
    """Functions with a parameter ``args`` that is unannotated, ``Any`` or a ``Namespace`` and that they
    read or pass on: the signature of a function fed ``parse_args()``."""
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        params = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
        param = next((p for p in params if p.arg == "args"), None)
        if param is None:
            continue
        note = ast.unparse(param.annotation) if param.annotation is not None else ""
        if note and note not in ("Any", "typing.Any") and "Namespace" not in note:
            continue  # a concrete type, e.g. TrainingArguments
        if _uses(fn, "args"):
            found.append((fn.name, fn.lineno))
    return found


def _namespace_problems(module: str) -> list[str]:
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = path.relative_to(SRC.parent)
    problems = [
        f"{rel}:{n.lineno}: imports argparse"
        for n in ast.walk(tree)
        if (isinstance(n, ast.Import) and any(a.name == "argparse" for a in n.names))
        or (isinstance(n, ast.ImportFrom) and n.module == "argparse")
    ]
    problems += [
        f"{rel}:{line}: {name}() reads or passes on an untyped args (an argparse Namespace?)"
        for name, line in _untyped_namespace_params(tree)
    ]
    return problems


def test_only_the_cli_parses_arguments():
    """Library functions take typed arguments; ``argparse`` and its Namespace stay in hizli.cli."""
    library = [m for m in LIBRARY if layer(m) < LAYERS["cli"]]
    offenders = {m: _namespace_problems(m) for m in library}
    offenders = {m: p for m, p in offenders.items() if p}
    new = {m: p for m, p in offenders.items() if m not in KNOWN_NAMESPACE}
    assert not new, "argument parsing outside hizli.cli (take typed arguments instead):\n" + "\n".join(
        line for p in new.values() for line in p
    )
    gone = set(KNOWN_NAMESPACE) - set(offenders)
    assert not gone, f"fixed, so remove from KNOWN_NAMESPACE: {sorted(gone)}"


# ---------------------------------------------------------------------------------------------
# The checks themselves catch what they are meant to


def test_the_checks_see_function_level_relative_and_from_imports(tmp_path, monkeypatch):
    fake = {
        "hizli.kernels.k": "def f():\n    from hizli.models import m\n",
        "hizli.models.m": "from . import n\nimport hizli.models.n\n",
        "hizli.models.n": "from ..models.m import x\n",
        "hizli.models.__init__": "",
        "hizli.data.d": "import argparse\n\ndef run(args):\n    return args.path\n\ndef fwd(args):\n    return run(args)\n",
        "hizli.train.t": "def ok(args: TrainingArguments):\n    return args.lr\n\ndef f(*args):\n    return g(*args)\n",
    }
    modules = {}
    for name, text in fake.items():
        path = tmp_path / "src" / Path(*name.split(".")).with_suffix(".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        modules[name.removesuffix(".__init__")] = path
    globals_ = globals()
    monkeypatch.setitem(globals_, "MODULES", modules)
    monkeypatch.setitem(globals_, "SRC", tmp_path / "src")
    monkeypatch.setitem(globals_, "LIBRARY", [m for m in modules if m != FACADE])
    edges = [i for m in modules for i in imports_of(m)]
    pairs = {(e.importer, e.imported, e.line) for e in edges}
    assert ("hizli.kernels.k", "hizli.models.m", 2) in pairs  # inside a function: upward
    assert ("hizli.models.m", "hizli.models.n", 1) in pairs and ("hizli.models.m", "hizli.models.n", 2) in pairs
    assert ("hizli.models.n", "hizli.models.m", 1) in pairs  # relative, two levels
    assert _cycles(edges) == [["hizli.models.m", "hizli.models.n"]]
    assert [layer(e.imported) > layer(e.importer) for e in edges].count(True) == 1
    assert len(_namespace_problems("hizli.data.d")) == 3 and not _namespace_problems("hizli.train.t")
    with pytest.raises(AssertionError, match="no layer"):
        layer("hizli.eval.x")


def test_no_function_takes_more_than_six_positional_arguments():
    """Past six, arguments go by keyword. Exempt: Triton kernels (``lazy_jit``: their launcher passes
    every argument positionally) and ``autograd.Function`` forward/backward (``apply`` takes no keywords)."""
    many = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        functions = [
            n
            for cls in ast.walk(tree)
            if isinstance(cls, ast.ClassDef) and any("Function" in ast.unparse(b) for b in cls.bases)
            for n in cls.body
            if isinstance(n, ast.FunctionDef) and n.name in ("forward", "backward")
        ]
        autograd = {id(n) for n in functions}
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or id(fn) in autograd:
                continue
            if any("jit" in ast.unparse(d) for d in fn.decorator_list):
                continue
            positional = [a.arg for a in fn.args.posonlyargs + fn.args.args if a.arg not in ("self", "cls")]
            if len(positional) > 6:
                many.append(f"{path.relative_to(SRC.parent)}:{fn.lineno}: {fn.name}() takes {len(positional)}")
    assert not many, "make the arguments past the sixth keyword-only:\n" + "\n".join(many)
