"""The numerical core imports nothing but itself and array libraries (no configs, files,
command lines or checkpoints) and opens no files. Read from the sources (every import
statement, also those inside functions), so a lazy import cannot slip through."""

import ast
import pathlib
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "qcsbm_jax"
# The core is what pyproject.toml has the type checker check.
CORE_PATHS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]["files"]
CORE = tuple(pathlib.Path(p).stem for p in CORE_PATHS)
# Outside the package the core may import only array libraries, absl's logging, and the
# standard library's modules for computation (no os, files, processes or signals).
ALLOWED = {"jax", "jaxlib", "numpy", "flax", "optax", "absl.logging", "dataclasses",
           "functools", "typing", "collections", "math", "numbers", "itertools", "enum",
           "abc", "warnings", "__future__"}


def core_files() -> list[pathlib.Path]:
    files = []
    for name in CORE_PATHS:
        path = ROOT / name
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def imports(path: pathlib.Path) -> set[str]:
    """Dotted names of the modules a file imports (absolute; relative ones resolved)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x: resolve against the file's package
                parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
                base = ".".join(parts[:len(parts) - node.level])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            # from qcsbm_jax import sde: the module is qcsbm_jax.sde; from absl import
            # logging: absl.logging.
            if module in ("qcsbm_jax", "absl"):
                names |= {f"{module}.{a.name}" for a in node.names}
            else:
                names.add(module)
    return names


def is_core(name: str) -> bool:
    parts = name.split(".")
    return parts[0] == "qcsbm_jax" and len(parts) > 1 and parts[1] in CORE


def is_allowed(name: str) -> bool:
    parts = name.split(".")
    return is_core(name) or any(".".join(parts[:i]) in ALLOWED for i in (1, 2))


@pytest.mark.parametrize("path", core_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_core_imports_only_the_core_and_array_libraries(path):
    outside = sorted(n for n in imports(path) if not is_allowed(n))
    assert outside == [], f"{path.name} imports {outside}: the core takes plain arguments"


# Builtins that reach files or run code: the core has no business with them.
FORBIDDEN_CALLS = {"open", "exec", "eval", "compile", "__import__", "input"}


def forbidden_calls(path: pathlib.Path) -> set[str]:
    return {node.func.id for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id in FORBIDDEN_CALLS}


@pytest.mark.parametrize("path", core_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_core_opens_no_files_and_runs_no_code(path):
    assert forbidden_calls(path) == set(), f"{path.name} calls {forbidden_calls(path)}"


def test_the_check_sees_a_forbidden_import_inside_a_function(tmp_path):
    module = tmp_path / "probe.py"
    module.write_text("import os\nfrom absl import logging, flags\n\n\ndef f():\n"
                      "    from qcsbm_jax import config, sde\n    import ml_collections\n")
    found = imports(module)
    assert found == {"os", "absl.logging", "absl.flags", "qcsbm_jax.config", "qcsbm_jax.sde",
                     "ml_collections"}
    assert sorted(n for n in found if not is_allowed(n)) == [
        "absl.flags", "ml_collections", "os", "qcsbm_jax.config"]
    module.write_text("def f(path):\n    return open(path).read()\n")
    assert forbidden_calls(module) == {"open"}
