"""The package's shape: no import circles, stages in order, dependencies visible, digests from imports."""
from __future__ import annotations

import ast
import shutil
import tomllib
from pathlib import Path

import pytest

from kvplan import errors, sources

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "kvplan"

# Lower layers never import higher ones. Stages in the order they run; profiles (which checks
# pass names against the surgery registry) sits above surgery; target and cli above everything.
LAYERS = [
    {"kvplan", "kvplan.errors", "kvplan.lazy", "kvplan.stack", "kvplan.fileio", "kvplan.sources", "kvplan.config",
     "kvplan.kv_write",
     "kvplan.cache_io", "kvplan.decoder", "kvplan.manifest", "kvplan.forked", "kvplan.pipeline"},
    {"kvplan.models"},
    {"kvplan.export"},
    {"kvplan.quantize"},
    {"kvplan.surgery"},
    {"kvplan.profiles"},
    {"kvplan.embed_head"},
    {"kvplan.trt"},
    {"kvplan.runtime"},
    {"kvplan.validate"},
    {"kvplan.generate"},
    {"kvplan.target"},
    {"kvplan.cli", "kvplan.__main__"},
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _module_level_imports(path: Path, name: str) -> set[str]:
    """kvplan modules a file imports when it is imported (function bodies excluded)."""
    tree = ast.parse(path.read_text())
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in tree.body:
        for sub in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) else ():
            if isinstance(sub, ast.Import):
                found.update(a.name for a in sub.names)
            elif isinstance(sub, ast.ImportFrom):
                base = sub.module or ""
                if sub.level:
                    base = ".".join(package[:len(package) - sub.level + 1] + ([sub.module] if sub.module else []))
                submodules = {f"{base}.{a.name}" for a in sub.names} & set(_modules())
                # `from pkg import submodule` depends on the submodule, not on pkg's own code
                # beyond what Python runs anyway.
                found.update(submodules or {base})
                if len(submodules) < len(sub.names):
                    found.add(base)
            elif (isinstance(sub, ast.Call) and getattr(sub.func, "id", None) == "lazy_import" and sub.args
                  and isinstance(sub.args[0], ast.Constant)):
                found.add(sub.args[0].value)              # a dependency named lazily is one all the same
    return {m for m in found if sources.module_file(m) is not None and m != name}


def _graph() -> dict[str, set[str]]:
    return {name: _module_level_imports(path, name) for name, path in _modules().items()}


def _layer(module: str) -> int:
    for i, layer in enumerate(LAYERS):
        if any(module == top or module.startswith(top + ".") for top in layer if top != "kvplan"):
            return i
    if module in LAYERS[0]:
        return 0
    raise AssertionError(f"{module} is in no layer of this test: add it to LAYERS")


def test_no_import_circle_inside_the_package():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_stage_imports_a_later_stage():
    bad = [f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
           for a, targets in _graph().items() for b in targets
           # a subpackage's __init__ re-exporting its own modules is not a dependency upward
           if _layer(b) > _layer(a)]
    assert not bad, "\n".join(bad)


def test_function_local_imports_are_only_lazy_heavy_backends_and_say_so():
    """A dependency hidden in a function body is allowed only where importing it eagerly would
    cost a process that never uses it (torch in the engine path, optional packages), with a
    comment on the line or the line above saying why."""
    hidden = []
    for path in _modules().values():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    if isinstance(sub, (ast.Import, ast.ImportFrom)):
                        here, above = lines[sub.lineno - 1], lines[sub.lineno - 2]
                        commented = "#" in here or above.strip().startswith("#") or "lazily" in above
                        if not commented:
                            hidden.append(f"{path.relative_to(ROOT)}:{sub.lineno}: {here.strip()}")
    assert not hidden, "function-local imports without a reason:\n" + "\n".join(hidden)


def test_every_subpackage_is_in_the_wheel():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
    assert on_disk <= listed, f"subpackages missing from pyproject's packages: {sorted(on_disk - listed)}"
    assert "kvplan.profiles" in listed and not any(p.split(".")[0] in ("build", "surgery") for p in listed)


def test_every_data_file_of_the_package_is_in_the_wheel():
    """Files beside the modules (the validation text) travel only where pyproject's package-data
    names them; the shipped profiles are checked above."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    files = [p for p in PACKAGE.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")
             and "__pycache__" not in p.parts]
    missing = [str(p.relative_to(ROOT)) for p in files
               if not any(p.match(pattern) for pattern in data.get(".".join(p.parent.relative_to(ROOT).parts), []))]
    assert files and not missing, f"package data missing from pyproject's package-data: {missing}"


def test_stage_digest_covers_the_helpers_a_stage_imports(tmp_path):
    """Editing kvplan/fileio.py (which the export stage uses to write its file) changes the export
    stage's source digest; editing the engine builder does not."""
    copy = tmp_path / "kvplan"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = sources.source_digest("kvplan.export", root=copy)
    assert copy / "fileio.py" in sources.closure("kvplan.export", root=copy)

    (copy / "trt" / "build.py").write_text((copy / "trt" / "build.py").read_text() + "\n# edited\n")
    assert sources.source_digest("kvplan.export", root=copy) == before

    (copy / "fileio.py").write_text((copy / "fileio.py").read_text() + "\n# edited\n")
    assert sources.source_digest("kvplan.export", root=copy) != before


def test_closure_follows_relative_and_from_package_imports(tmp_path):
    pkg = tmp_path / "kvplan"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from kvplan import c  # lazily\n")
    (pkg / "c.py").write_text("import os\n")
    (pkg / "unused.py").write_text("")
    names = {p.relative_to(tmp_path).as_posix() for p in sources.closure("kvplan.a", root=pkg)}
    assert names == {"kvplan/__init__.py", "kvplan/a.py", "kvplan/sub/__init__.py", "kvplan/sub/b.py", "kvplan/c.py"}


def test_unknown_module_is_refused():
    with pytest.raises(ValueError, match="kvplan.nothing"):
        sources.closure("kvplan.nothing")


@pytest.mark.parametrize("name", ["UserError", "ConfigError", "ModelError", "ProfileError", "ExportError",
                                  "QuantizeError", "SurgeryError", "OpsetError", "BackendError", "BuildError"])
def test_every_named_error_is_a_kvplan_error(name):
    assert issubclass(getattr(errors, name), errors.KvplanError)


def test_no_exception_class_outside_the_error_root():
    """Exceptions a user can see derive from KvplanError; the surgery matcher's internal
    Rejected (caught inside the pass framework) is the one control-flow exception."""
    stray = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    isinstance(b, ast.Name) and b.id in ("Exception", "RuntimeError", "ValueError") for b in node.bases):
                if name != "kvplan.errors" and node.name != "Rejected":
                    stray.append(f"{name}.{node.name}")
    assert not stray, f"exception classes outside kvplan.errors: {stray}"
