"""The documentation is tested like code: tables match the source, examples run, the site builds.

Examples run with ``pytester`` in a fresh pytest subprocess against a real
``mlx_lm.server`` and the tiny offline model, exactly as a reader would run them.
Regenerate the options table with ``python tests/test_docs.py --write-options``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from support import wait_until

from pytest_metaloom.inject import faults
from pytest_metaloom.judge import oracle
from pytest_metaloom.options import OPTIONS, Option

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLES = DOCS / "examples"
OPTIONS_PAGE = DOCS / "reference" / "options.md"
TABLE_START = "<!-- options-table:start -->"
TABLE_END = "<!-- options-table:end -->"
EXAMPLE_MARK = re.compile(r"<!--\s*example:\s*(\S+)\s*-->\s*\n```python\n(.*?)```", re.DOTALL)

# What each example must report when a reader runs it (pytest's outcome counts).
EXAMPLE_OUTCOMES: dict[str, dict[str, int]] = {
    "test_first_server.py": {"passed": 1},
    "test_downstream_oom.py": {"passed": 1, "xfailed": 1},
    "test_fixture_factory.py": {"passed": 2},
    "test_wired_trigger.py": {"passed": 1},
    "test_own_server.py": {"passed": 1},
}


# -- the options table -------------------------------------------------------------


def default_text(option: Option) -> str:
    """How the page shows an option's default."""
    if option.kind == "list":
        return "(none)"
    if option.default is None:
        return "(none)"
    if isinstance(option.default, bool):
        return "`true`" if option.default else "`false`"
    return f"`{option.default}`"


def flag_text(option: Option) -> str:
    if option.kind == "bool":
        return f"`{option.flag}`"
    return f"`{option.flag} {option.metavar or 'VALUE'}`"


def options_table() -> str:
    """The options table in Markdown, one row per entry of ``OPTIONS``."""
    lines = [
        "| flag | ini key | environment | default | description |",
        "|---|---|---|---|---|",
    ]
    for option in OPTIONS:
        cells = [
            flag_text(option),
            f"`{option.ini}`",
            f"`{option.env}`",
            default_text(option),
            option.help.replace("|", "\\|"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _split_row(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [cell.strip().replace("\\|", "|") for cell in cells]


def page_table_rows(text: str) -> list[list[str]]:
    """The data rows of the table between the options-table markers."""
    if TABLE_START not in text or TABLE_END not in text:
        raise AssertionError(
            f"{OPTIONS_PAGE} lost its {TABLE_START} / {TABLE_END} markers; "
            "run `python tests/test_docs.py --write-options` to restore the table"
        )
    block = text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0]
    rows = [line for line in block.splitlines() if line.strip().startswith("|")]
    return [_split_row(line) for line in rows[2:]]  # skip header and separator


def write_options_table() -> None:
    text = OPTIONS_PAGE.read_text()
    head, rest = text.split(TABLE_START, 1)
    tail = rest.split(TABLE_END, 1)[1]
    OPTIONS_PAGE.write_text(f"{head}{TABLE_START}\n{options_table()}\n{TABLE_END}{tail}")


def test_options_page_matches_option_table() -> None:
    rows = page_table_rows(OPTIONS_PAGE.read_text())
    fix = "run `python tests/test_docs.py --write-options`"
    page_flags = [row[0].strip("`").split()[0] for row in rows]
    assert page_flags == [o.flag for o in OPTIONS], f"flags differ from options.OPTIONS; {fix}"
    for row, option in zip(rows, OPTIONS, strict=True):
        expected = [
            flag_text(option),
            f"`{option.ini}`",
            f"`{option.env}`",
            default_text(option),
            option.help,
        ]
        assert row == expected, f"row of {option.flag} is stale; {fix}"


def test_options_table_parser_sees_a_wrong_default() -> None:
    # The check above is only worth something if a stale page really fails it.
    stale = options_table().replace("`60.0`", "`30.0`", 1)
    text = f"{TABLE_START}\n{stale}\n{TABLE_END}\n"
    rows = page_table_rows(text)
    timeout = next(r for r in rows if r[0].startswith("`--metaloom-start-timeout"))
    assert timeout[3] == "`30.0`"
    option = next(o for o in OPTIONS if o.flag == "--metaloom-start-timeout")
    assert timeout[3] != default_text(option)


# Names the injector reads inside the server (ARCHITECTURE.md, fault-spec reference).
SERVER_ENV = {
    "METALOOM_FAULTS",
    "METALOOM_LIMITS",
    "METALOOM_EVENTS",
    "METALOOM_CONTROL",
    "METALOOM_SEMANTICS",
    "METALOOM_HANG_MAX",
}


def test_options_page_warns_about_exactly_the_colliding_env_names() -> None:
    # Servers inherit the environment, so an option's env name that the injector also
    # reads changes the servers. The warning must name exactly those (and go when fixed).
    text = OPTIONS_PAGE.read_text()
    start, end = "<!-- env-collisions:start -->", "<!-- env-collisions:end -->"
    block = text.split(start, 1)[1].split(end, 1)[0] if start in text else ""
    warned = set(re.findall(r"`(METALOOM_[A-Z_]+)`", block))
    colliding = {o.env for o in OPTIONS} & SERVER_ENV
    assert warned == colliding, (
        f"options.md warns about {sorted(warned)} but the colliding names are "
        f"{sorted(colliding)}; update the env-collisions block (drop the warning if none)"
    )


# -- pages agree with the code -------------------------------------------------------


def test_concepts_quote_every_fault_text_and_outcome_order() -> None:
    text = (DOCS / "concepts.md").read_text()
    for name, kind in faults.FAULT_KINDS.items():
        assert f"`{name}`" in text, f"concepts.md does not list fault kind {name}"
        if kind.template:
            exact = faults.message(name)
            assert exact in text, f"concepts.md lacks the exact text of {name}: {exact}"
    order = " > ".join(f"`{name}`" for name in oracle.OUTCOMES)
    assert order in text, f"concepts.md must state the outcome order as: {order}"
    assert f"`{oracle.NOT_FIRED}`" in text


def test_fixtures_page_lists_every_plugin_fixture() -> None:
    from pytest_metaloom import plugin

    text = (DOCS / "reference" / "fixtures.md").read_text()
    names = [
        name
        for name in dir(plugin)
        if hasattr(getattr(plugin, name), "_fixture_function_marker")
        or type(getattr(plugin, name)).__name__ == "FixtureFunctionDefinition"
    ]
    assert "mlx_server" in names, "fixture discovery in this test is broken"
    for name in [*names, "mlx_server_fixture"]:
        assert f"## `{name}" in text, f"fixtures.md has no section for {name}"


# -- examples are included verbatim and run --------------------------------------------


def _included_examples() -> dict[str, list[tuple[Path, str]]]:
    found: dict[str, list[tuple[Path, str]]] = {}
    for page in DOCS.rglob("*.md"):
        for match in EXAMPLE_MARK.finditer(page.read_text()):
            found.setdefault(match.group(1), []).append((page, match.group(2)))
    return found


def test_every_example_is_shown_verbatim() -> None:
    included = _included_examples()
    files = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert files == sorted(EXAMPLE_OUTCOMES), "EXAMPLE_OUTCOMES must cover docs/examples/*.py"
    for name in files:
        assert name in included, f"docs/examples/{name} is shown on no page"
    for name, places in included.items():
        source = EXAMPLES / name
        assert source.is_file(), f"a page includes {name}, which is not in docs/examples/"
        for page, block in places:
            assert block == source.read_text(), (
                f"{page.relative_to(ROOT)} shows an outdated copy of docs/examples/{name}; "
                "paste the file's current text into the code block"
            )


@pytest.fixture
def example_env(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pytester moves HOME; point the subprocess at the tiny model already built."""
    monkeypatch.setenv("METALOOM_CACHE_DIR", str(model_dir.parent))


def _servers_started_under(root: Path) -> list[int]:
    """Pids of live processes whose metaloom run directory lies under ``root``."""
    pids = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            events = proc.environ().get("METALOOM_EVENTS", "")
        except (psutil.Error, OSError):
            continue
        if events.startswith(str(root)) and proc.info["status"] != psutil.STATUS_ZOMBIE:
            pids.append(proc.info["pid"])
    return pids


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(EXAMPLE_OUTCOMES))
def test_example_runs(name: str, pytester: pytest.Pytester, example_env: None) -> None:
    pytester.makepyfile(**{name[:-3]: (EXAMPLES / name).read_text()})
    # Each example test is bounded by pytest-timeout inside; a slow one fails there.
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--timeout=60", "-rxXs", timeout=300
    )
    try:
        result.assert_outcomes(**EXAMPLE_OUTCOMES[name])
    finally:
        wait_until(lambda: not _servers_started_under(pytester.path))
        left = _servers_started_under(pytester.path)
        for pid in left:
            psutil.Process(pid).kill()
    assert not left, f"{name} left servers running: {left}"


# -- the site -------------------------------------------------------------------------


def _nav_files(nav: object) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [f for item in nav for f in _nav_files(item)]
    if isinstance(nav, dict):
        return [f for value in nav.values() for f in _nav_files(value)]
    return []


def test_every_page_is_in_the_nav_and_linked_from_the_index() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML (a mkdocs dependency) is not installed")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config.get("strict") is True, "mkdocs.yml must set strict: true"
    nav = set(_nav_files(config["nav"]))
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert pages - nav == set(), f"pages missing from the nav in mkdocs.yml: {pages - nav}"
    index = (DOCS / "index.md").read_text()
    for page in sorted(pages - {"index.md"}):
        assert f"({page})" in index or f"({page}#" in index, f"index.md does not link {page}"


def test_mkdocs_build_is_strict_and_clean(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install -e '.[docs]'")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml")]
        + ["-d", str(tmp_path / "site")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNING" not in output, output
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "reference" / "options" / "index.html").is_file()


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-options"]:
        write_options_table()
        print(f"wrote {OPTIONS_PAGE.relative_to(ROOT)}")
    else:
        sys.exit("usage: python tests/test_docs.py --write-options")
