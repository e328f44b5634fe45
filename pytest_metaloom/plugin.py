"""The pytest entry point (``pytest11``). Kept thin and import-light.

Options and ini keys come from one table (``options.py``); fixtures live in
``fixtures.py``; the OOM matrix is collected only with ``--metal-oom``. Nothing here
imports mlx or mlx_lm: users who never ask for metaloom pay almost nothing.
"""

from __future__ import annotations

import signal

import pytest

from pytest_metaloom import __version__
from pytest_metaloom.fixtures import (  # noqa: F401 - fixtures are registered by being importable here
    metaloom_injector,
    metaloom_settings,
    mlx_server,
    mlx_server_factory,
    mlx_server_session,
    settings_of,
    stop_all_servers,
    tiny_model,
)
from pytest_metaloom.options import OPTIONS
from pytest_metaloom.versions import backend_name, dist_version

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


def pytest_report_header(config: pytest.Config) -> str:
    settings = settings_of(config)
    backend = backend_name()
    mode = "real Metal" if settings.metaloom_real_metal else "simulated Metal faults"
    model = settings.metaloom_model or settings.metaloom_url or "built-in tiny model"
    return (
        f"metaloom: {__version__}, mlx {dist_version('mlx')}, mlx-lm {dist_version('mlx-lm')}, "
        f"backend {backend} ({mode}), model: {model}"
    )


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"received {signal.Signals(signum).name}")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "metal_oom: a Metal OOM scenario (collected with --metal-oom)"
    )
    # pytest does not run finalizers on SIGTERM; turning it into an interrupt does.
    try:
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _raise_interrupt)
            config._metaloom_sigterm = True  # type: ignore[attr-defined]
    except ValueError:  # not the main thread (embedded pytest)
        pass


def pytest_unconfigure(config: pytest.Config) -> None:
    stop_all_servers()
    if getattr(config, "_metaloom_sigterm", False):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    settings = settings_of(config)
    if not settings.metal_oom:
        return
    from pytest_metaloom.items import collect_matrix

    items.extend(collect_matrix(session, settings))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when != "call" and not (report.when == "setup" and report.failed):
        return
    if not any(name == "metaloom" for name, _ in report.user_properties):
        return
    from pytest_metaloom.report.document import records_from_user_properties

    config = _current_config
    if config is not None:
        config._metaloom_records.extend(records_from_user_properties(report.user_properties))


_current_config: pytest.Config | None = None


def pytest_sessionstart(session: pytest.Session) -> None:
    global _current_config
    _current_config = session.config
    session.config._metaloom_records = []  # type: ignore[attr-defined]


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    records = getattr(config, "_metaloom_records", [])
    if not records:
        return
    from pytest_metaloom.report.table import format_table

    terminalreporter.write_sep("=", "metaloom: Metal OOM matrix")
    for line in format_table(records):
        terminalreporter.write_line(line)
    path = settings_of(config).metaloom_report
    if path and not hasattr(config, "workerinput"):
        terminalreporter.write_line(f"report written to {path}")


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    pool = getattr(config, "_metaloom_pool", None)
    if pool is not None:
        pool.close()
    stop_all_servers()
    settings = settings_of(config)
    records = getattr(config, "_metaloom_records", [])
    if settings.metaloom_report and records and not hasattr(config, "workerinput"):
        from pytest_metaloom.report.document import build_report, write_report

        write_report(
            settings.metaloom_report,
            build_report(
                records,
                seed=settings.metaloom_seed,
                patch_sets=settings.metaloom_patch_set or ["installed"],
            ),
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.failed:
        lines = settings_of(item.config).metaloom_log_lines
        for name, value in getattr(item, "funcargs", {}).items():
            tail = _log_tail_of(value, lines)
            if tail:
                report.sections.append((f"{LOG_SECTION} ({name})", tail))
    return report


def _log_tail_of(value: object, lines: int) -> str:
    log_tail = getattr(value, "log_tail", None)
    if not callable(log_tail) or not hasattr(value, "is_alive"):
        return ""
    try:
        return log_tail(lines)
    except Exception:  # a report must never crash on a broken server handle
        return ""
