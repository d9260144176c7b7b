"""Which of kvplan's own source files a stage runs, found from its imports.

A stage's manifest entry hashes the code that produced its artifacts, so a change to
that code rebuilds the stage and a change elsewhere does not. The files are the
import closure of the stage's entry modules inside the ``kvplan`` package (parent
packages' ``__init__`` included, as Python runs them), read from the source with
``ast`` rather than kept by hand, so a helper a stage starts using is covered the
day it is imported.
"""
from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

PACKAGE = "kvplan"
PACKAGE_DIR = Path(__file__).resolve().parent


def module_file(name: str, root: Path = PACKAGE_DIR) -> Path | None:
    """The source file of ``kvplan[.x.y]`` under the package directory ``root``, or None when
    it is not a module of the package."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = root.joinpath(*parts[1:])
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@functools.cache
def _imported(path: Path, root: Path) -> set[str]:
    """kvplan modules named by the imports of one file (absolute or relative). Parsed once per
    process, as the closures are (imports do not change under a running build)."""
    tree = ast.parse(path.read_text(), str(path))
    here = _module_name(path, root).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in _statements(tree.body):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)   # `from pkg import submodule`
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.Expr)):
            call = node.value
            if (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "lazy_import"
                    and call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str)):
                found.add(call.args[0].value)                        # name = lazy_import("kvplan.x")
    return {m for m in found if module_file(m, root) is not None}


def _statements(body: list):
    """Every statement, nested ones included (function, class, if, try, with bodies), without
    walking expressions: imports and ``lazy_import`` assignments are statements, and a walk of
    every expression node costs most of a no-op rebuild."""
    for node in body:
        yield node
        for name in ("body", "orelse", "finalbody", "handlers", "cases"):
            inner = getattr(node, name, None)
            if isinstance(inner, list):
                yield from _statements(inner)


def closure(*modules: str, root: Path = PACKAGE_DIR) -> tuple[Path, ...]:
    """Every kvplan source file the given modules import, directly or not, themselves included."""
    return _closure(root, tuple(sorted(modules)))


@functools.cache
def _closure(root: Path, modules: tuple[str, ...]) -> tuple[Path, ...]:
    seen: dict[str, Path] = {}
    todo = list(modules)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):        # importing a.b.c runs a and a.b first
            prefix = ".".join(parts[:i])
            if prefix in seen:
                continue
            path = module_file(prefix, root)
            if path is None:
                raise ValueError(f"{prefix}: not a module of the {PACKAGE} package")
            seen[prefix] = path
            todo.extend(_imported(path, root))
    return tuple(sorted(set(seen.values())))


def source_digest(*modules: str, root: Path = PACKAGE_DIR) -> str:
    """Hash of the files in ``closure(*modules)``: paths relative to the package and contents.

    The closure is cached per process (imports do not change under a running build);
    the contents are read each time."""
    h = hashlib.sha256()
    for f in closure(*modules, root=root):
        h.update(str(f.relative_to(root.parent)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()
