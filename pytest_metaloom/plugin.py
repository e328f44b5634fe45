"""The pytest entry point (``pytest11``). Kept thin, import-light and inert unless used.

Options and ini keys come from one table (``options.py``); fixtures and the per-session
state live in ``fixtures.py``; the OOM matrix is collected only with ``--metal-oom``.
Without ``--metal-oom`` and without a metaloom fixture, a run of any project is what it
would be without this plugin: no signal handler, no temp dirs, no model, no header line.
Nothing here imports mlx or mlx_lm.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from pytest_metaloom import __version__
from pytest_metaloom.config import Settings
from pytest_metaloom.fixtures import (  # noqa: F401 - fixtures are registered by being importable here
    METALOOM_FIXTURES,
    STATE,
    SessionState,
    metaloom_injector,
    metaloom_settings,
    mlx_server,
    mlx_server_factory,
    mlx_server_session,
    settings_of,
    state_of,
    tiny_model,
)
from pytest_metaloom.options import OPTIONS
from pytest_metaloom.versions import backend_name, dist_version, mlx_lm_window_warning

LOG_SECTION = "metaloom server log"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("metaloom", "Metal OOM fault injection for mlx_lm.server")
    for option in OPTIONS:
        kwargs: dict = {"dest": option.dest, "help": option.help, "default": None}
        if option.kind == "bool":
            kwargs["action"] = "store_true"
        elif option.kind == "list":
            kwargs["action"] = "append"
        if option.metavar and option.kind != "bool":
            kwargs["metavar"] = option.metavar
        group.addoption(option.flag, **kwargs)
        ini_type = {"bool": "bool", "list": "args"}.get(option.kind, "string")
        parser.addini(option.ini, option.help, type=ini_type, default=None)


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    """Versions, backend and model: shown when metaloom is configured (any option set)."""
    settings = settings_of(config)
    if settings == Settings():
        return None
    mode = "real Metal" if settings.metaloom_real_metal else "simulated Metal faults"
    model = settings.metaloom_model or settings.metaloom_url or "built-in tiny model"
    lines = [
        f"metaloom: {__version__}, mlx {dist_version('mlx')}, mlx-lm {dist_version('mlx-lm')}, "
        f"backend {backend_name()} ({mode}), model: {model}"
    ]
    warning = mlx_lm_window_warning()
    if warning:
        lines.append(f"metaloom: WARNING: {warning}")
    return lines


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "metal_oom: a Metal OOM scenario (collected with --metal-oom)"
    )
    state = state_of(config)
    if not state.settings.metal_oom:
        return
    if config.args_source != pytest.Config.ArgsSource.ARGS:
        # `pytest --metal-oom` runs the matrix only; the project's testpaths (or the
        # current directory) are collected only when named on the command line
        config.args = []
        config.args_source = pytest.Config.ArgsSource.INVOCATION_DIR
    state.arm_sigterm()
    config.pluginmanager.register(MatrixSession(state), "metaloom-matrix")


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(STATE, None)
    if state is not None:
        state.close()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    state = state_of(config)
    if state.settings.metal_oom:
        from pytest_metaloom.items import collect_matrix

        items.extend(collect_matrix(session, state))
    _bound_live_tests(config, state, items)


def _bound_live_tests(config: pytest.Config, state: SessionState, items: list[pytest.Item]) -> None:
    """Give tests that start servers a pytest-timeout bound when the user configured none."""
    if not config.pluginmanager.hasplugin("timeout") or _timeout_configured(config):
        return
    live = [
        item
        for item in items
        if METALOOM_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        and item.get_closest_marker("timeout") is None
    ]
    if not live:
        return
    from pytest_metaloom.matrix.pool import live_test_timeout

    seconds = live_test_timeout(state.settings)
    for item in live:
        item.add_marker(pytest.mark.timeout(seconds))


def _timeout_configured(config: pytest.Config) -> bool:
    if config.getoption("timeout", None) is not None or os.environ.get("PYTEST_TIMEOUT"):
        return True
    try:
        return bool(config.getini("timeout"))
    except ValueError:
        return False


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.failed:
        state = item.config.stash.get(STATE, None)
        if state is not None and state.servers:
            lines = state.settings.metaloom_log_lines
            for name, value in getattr(item, "funcargs", {}).items():
                if state.owns(value):
                    tail = _log_tail_of(value, lines)
                    if tail:
                        report.sections.append((f"{LOG_SECTION} ({name})", tail))
    return report


def _log_tail_of(value: Any, lines: int) -> str:
    try:
        return value.log_tail(lines)
    except Exception:  # a report must never crash on a broken server handle
        return ""


class MatrixSession:
    """Hooks of a ``--metal-oom`` run (registered only then): records, table, JSON report."""

    def __init__(self, state: SessionState) -> None:
        self.state = state

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "call" and not (report.when == "setup" and report.failed):
            return
        from pytest_metaloom.report.document import records_from_user_properties

        self.state.records.extend(records_from_user_properties(report.user_properties))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.state.records:
            return
        from pytest_metaloom.report.table import format_table

        terminalreporter.write_sep("=", "metaloom: Metal OOM matrix")
        for line in format_table(self.state.records):
            terminalreporter.write_line(line)
        path = self.state.settings.metaloom_report
        if path and not hasattr(terminalreporter.config, "workerinput"):
            terminalreporter.write_line(f"report written to {path}")

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        state = self.state
        if state.pool is not None:
            pool, state.pool = state.pool, None
            pool.close()
        settings = state.settings
        controller = not hasattr(session.config, "workerinput")
        if settings.metaloom_report and state.records and controller:
            from pytest_metaloom.report.document import build_report, write_report

            write_report(
                settings.metaloom_report,
                build_report(
                    state.records,
                    seed=settings.metaloom_seed,
                    patch_sets=settings.metaloom_patch_set or ["installed"],
                ),
            )
