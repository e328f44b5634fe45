"""The package's shape: the core never needs pytest, and no module import circle exists."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import pytest_metaloom

PACKAGE = Path(pytest_metaloom.__file__).resolve().parent
PYTEST_LAYER = {"pytest_metaloom.plugin", "pytest_metaloom.items", "pytest_metaloom.fixtures"}
IN_SERVER = {"pytest_metaloom.inject.bootstrap.sitecustomize"}  # loaded via PYTHONPATH only


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()
CORE = sorted(
    name for name in set(MODULES) - PYTEST_LAYER - IN_SERVER if not name.endswith("__main__")
)


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_package = MODULES[module].name == "__init__.py"
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _imports(module: str) -> set[str]:
    """Modules of this package that ``module`` imports, at the top or inside functions."""
    tree = ast.parse(MODULES[module].read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            names = [target, *(f"{target}.{alias.name}" for alias in node.names)]
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name.startswith("pytest_metaloom") and name != module:
                found.add(name)
    return found


def test_every_core_module_imports_without_pytest():
    code = (
        "import importlib, sys\n"
        "sys.modules['pytest'] = None\n"
        "sys.modules['_pytest'] = None\n"
        f"for name in {CORE!r}:\n"
        "    importlib.import_module(name)\n"
        "print(len(" + repr(CORE) + "))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.strip()) == len(CORE) > 20


def _third_party(module: str) -> set[str]:
    tree = ast.parse(MODULES[module].read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("module", CORE)
def test_core_module_imports_neither_pytest_nor_the_pytest_layer(module):
    """Also the imports inside functions, which importing the module does not run."""
    assert not (_imports(module) & PYTEST_LAYER)
    assert not (_third_party(module) & {"pytest", "_pytest", "pluggy", "xdist"})


def test_no_import_cycle():
    """Including the imports inside functions: a lazy import is still a dependency."""
    graph = {module: _imports(module) for module in MODULES}
    # a package's __init__ re-exporting its own modules is not a cycle through the package
    for module in graph:
        graph[module] = {
            dep
            for dep in graph[module]
            if not (MODULES[dep].name == "__init__.py" and module.startswith(dep + "."))
        }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep) :] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


ROOT = PACKAGE.parent


def test_the_test_environment_is_pinned_in_one_file_and_used_everywhere():
    from packaging.requirements import Requirement

    from pytest_metaloom.versions import TESTED_MLX_LM

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    pins = {}
    for line in (ROOT / "constraints" / "test.txt").read_text().splitlines():
        requirement = line.split("#")[0].split(";")[0].strip()
        if requirement:
            name, _, version = requirement.partition("==")
            assert version, f"constraints/test.txt: {line!r} is not an exact pin"
            pins[name.lower()] = version
    for tool in ("mlx-lm", "mlx", "pytest", "pytest-timeout", "pytest-xdist", "requests"):
        assert tool in pins, f"{tool} is not pinned"
    # the pinned mlx-lm is the newest release of the tested window the header checks
    assert TESTED_MLX_LM.endswith(f"<={pins['mlx-lm']}")
    readme = (ROOT / "README.md").read_text()
    assert "pip install -c constraints/test.txt -e '.[test]'" in readme
    assert "-c constraints/test.txt" in (ROOT / ".ci" / "run").read_text()
    assert "constraints/test.txt" in (ROOT / "tox.ini").read_text()
    # the package itself asks for ranges, never exact versions
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [
        r for extra in project["optional-dependencies"].values() for r in extra
    ]
    exact = [r for r in requirements if any(s.operator == "==" for s in Requirement(r).specifier)]
    assert not exact


def test_architecture_names_every_module():
    """ARCHITECTURE.md's module table is the newcomer's map: a module missing from it is a
    part of the chain nobody was told about."""
    text = (PACKAGE.parent / "ARCHITECTURE.md").read_text()
    missing = [
        path.relative_to(PACKAGE).as_posix()
        for path in MODULES.values()
        if path.name != "__init__.py" and f"`{path.relative_to(PACKAGE).as_posix()}`" not in text
    ]
    assert not missing, f"ARCHITECTURE.md's module table does not name: {missing}"
