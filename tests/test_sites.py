"""Fault sites are MLX's evaluation and synchronisation points in mlx-lm, nothing else.

Each rule of ``inject/runtime/locate.py`` names the real mlx-lm function and line it
stands for, in 0.32.2 and 0.31.3; these tests read the installed mlx-lm (0.32.2 here,
0.31.3 under ``tox -e mlx031``) and check every line named for that version.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import WAIT_ONLY_LINES

from pytest_metaloom.inject.runtime.locate import RULES

EVAL_CALLS = ("mx.eval(", "mx.async_eval(", ".item()", ".tolist()", "mx.synchronize(")
VERSION = importlib.metadata.version("mlx-lm")


def _package() -> Path:
    """The installed mlx_lm, found without importing it: these tests read source text, and
    importing mlx into the test process is work (and native state) they do not need."""
    import importlib.util

    spec = importlib.util.find_spec("mlx_lm")
    assert spec is not None and spec.origin, "mlx-lm is not installed"
    return Path(spec.origin).parent


def _functions(path: Path) -> dict[str, tuple[int, int]]:
    """qualname -> (first line, last line) of every function in a source file."""
    out: dict[str, tuple[int, int]] = {}

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                out[name] = (child.lineno, child.end_lineno or child.lineno)
                walk(child, name + ".<locals>.")
            elif isinstance(child, ast.ClassDef):
                walk(child, prefix + child.name + ".")

    walk(ast.parse(path.read_text()), "")
    return out


CASES = [
    (rule, where) for rule in RULES for version, where in rule.stands_for if version == VERSION
]


def test_every_rule_names_lines_for_both_versions() -> None:
    for rule in RULES:
        versions = {v for v, _ in rule.stands_for}
        if rule.qualname != "ResponseGenerator._serve_single" or rule.site != "prefill":
            assert versions == {"0.32.2", "0.31.3"}, rule
    assert CASES or VERSION not in ("0.32.2", "0.31.3")


@pytest.mark.parametrize(("rule", "where"), CASES, ids=[f"{r.site}-{w}" for r, w in CASES])
def test_site_rule_stands_for_a_real_evaluation_in_installed_mlx_lm(rule, where: str) -> None:
    file, line = where.split(":")
    path = _package() / file
    text = path.read_text().splitlines()[int(line) - 1]
    assert any(call in text for call in EVAL_CALLS), f"{where} is no evaluation: {text!r}"
    if rule.needle:
        assert rule.needle in text, f"{where}: {text!r} lacks {rule.needle!r}"
    first, last = _functions(path)[rule.qualname]
    assert first <= int(line) <= last, f"{where} is outside {rule.qualname}"


def test_prompt_cache_bookkeeping_evaluates_nothing_and_is_no_site() -> None:
    path = _package() / "models" / "cache.py"
    lines = path.read_text().splitlines()
    spans = _functions(path)
    for name in ("fetch_nearest_cache", "insert_cache", "trim_to"):
        first, last = spans[f"LRUPromptCache.{name}"]
        source = "\n".join(lines[first - 1 : last])
        assert not any(call in source for call in EVAL_CALLS), name
    assert not any(r.qualname.startswith("LRUPromptCache") for r in RULES)


def test_deep_copy_of_an_array_allocates_nothing() -> None:
    """Why the cache fetch cannot fail: its deepcopy shares the buffers (measured)."""
    code = (
        "import copy, mlx.core as mx\n"
        "a = mx.ones((4096, 4096)); mx.eval(a)\n"  # 64 MiB
        "before = mx.get_active_memory(); b = copy.deepcopy(a)\n"
        "lazy = mx.get_active_memory() - before; mx.eval(b)\n"
        "print(lazy, mx.get_active_memory() - before, a.nbytes)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    lazy, evaluated, nbytes = map(int, out)
    assert nbytes == 64 * 2**20
    assert lazy == 0 and evaluated == 0


def test_every_serving_path_evaluation_in_mlx_lm_is_covered() -> None:
    """Each evaluation call inside the functions the server runs maps to some rule."""
    package = _package()
    covered = {w for r in RULES for v, w in r.stands_for if v == VERSION}
    functions = {r.qualname for r in RULES}
    missing = []
    for file in ("generate.py", "server.py", "models/cache.py"):
        path = package / file
        lines = path.read_text().splitlines()
        for qualname, (first, last) in _functions(path).items():
            if qualname not in functions:
                continue
            for number in range(first, last + 1):
                if any(call in lines[number - 1] for call in EVAL_CALLS):
                    where = f"{file}:{number}"
                    inner = [
                        q
                        for q, (a, b) in _functions(path).items()
                        if q != qualname and q.startswith(qualname) and a <= number <= b
                    ]
                    if where not in covered and not inner:
                        missing.append(f"{where} ({qualname}): {lines[number - 1].strip()}")
    allowed = [m for m in missing if "distributed" in m or "mx.synchronize" in m]
    assert sorted(set(missing) - set(allowed)) == [], os.linesep.join(missing)


def test_copy_module_is_what_fetch_uses() -> None:
    """The fetch copies with the standard library's ``copy.deepcopy`` (read from the
    installed source), the copy the deep-copy measurement above stands for."""
    path = _package() / "models" / "cache.py"
    lines = path.read_text().splitlines()
    assert "import copy" in lines
    first, last = _functions(path)["LRUPromptCache.fetch_nearest_cache"]
    assert "copy.deepcopy(" in "\n".join(lines[first - 1 : last])


WAITS = sorted(WAIT_ONLY_LINES.get(VERSION, {}).items())


@pytest.mark.parametrize(("where", "call"), WAITS, ids=[w for w, _ in WAITS])
def test_wait_only_lines_are_the_waits_named_in_installed_mlx_lm(where: str, call: str) -> None:
    """The lines the live tests call wait-only: each evaluates only what the
    ``mx.async_eval`` before it committed (or the ``mx.eval`` before it evaluated)."""
    file, line = where.split(":")
    text = (_package() / file).read_text().splitlines()
    assert call in text[int(line) - 1], f"{where}: {text[int(line) - 1]!r} lacks {call!r}"
    earlier = "\n".join(text[int(line) - 12 : int(line) - 1])
    assert "mx.async_eval(" in earlier, f"nothing committed before {where}"
    assert any(where in [w for v, w in r.stands_for if v == VERSION] for r in RULES), where
