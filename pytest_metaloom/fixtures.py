"""Fixtures and fixture factories (the pytest face of ``live.LiveServer``).

Imports of mlx and the server machinery happen inside the fixtures, so merely loading
the plugin stays cheap.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from pytest_metaloom.config import Settings

_STARTED: weakref.WeakSet[Any] = weakref.WeakSet()


def stop_all_servers() -> None:
    """Stop every server the fixtures started and that is still running."""
    for server in list(_STARTED):
        with contextlib.suppress(Exception):
            server.stop()


def settings_of(config: pytest.Config) -> Settings:
    settings = getattr(config, "_metaloom_settings", None)
    if settings is None:
        settings = Settings.resolve(config.getoption, config.getini)
        config._metaloom_settings = settings  # type: ignore[attr-defined]
    return settings


def _run_dir(factory: pytest.TempPathFactory, name: str) -> Path:
    return factory.mktemp(f"metaloom-{name}", numbered=True)


def resolve_model(request: pytest.FixtureRequest, model: str | Path | None) -> Path | None:
    """Factory argument > --metaloom-model > the built-in tiny model."""
    settings = settings_of(request.config)
    if model is not None:
        return Path(model)
    if settings.model_path is not None:
        return settings.model_path
    if settings.metaloom_url:
        return None
    return request.getfixturevalue("tiny_model")


def start_server(
    request: pytest.FixtureRequest,
    *,
    model: str | Path | None = None,
    server_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    command: Sequence[str] | None = None,
    faults: str | None = None,
    limits: str | None = None,
    overlay: str | Path | None = None,
    guard: bool | None = None,
    name: str = "mlx-server",
    warmup: bool = True,
    server: str | None = None,
) -> Any:
    """Start a LiveServer configured from arguments > options > ini > defaults.

    ``server`` names a server profile (built-in name or .toml path) for this server only.
    """
    from pytest_metaloom.server.live import LiveServer
    from pytest_metaloom.server.profiles import load_profile

    settings = settings_of(request.config)
    factory = request.getfixturevalue("tmp_path_factory")
    profile = load_profile(server) if server is not None else settings.profile
    if command is None:
        command = settings.server_command if server is None else profile.command
    live = LiveServer(
        run_dir=_run_dir(factory, name),
        model=resolve_model(request, model),
        command=command,
        server_args=[*settings.server_args, *server_args],
        env={**profile.server_env(), **(env or {})},
        faults=faults,
        limits=limits,
        overlay=overlay,
        guard=settings.metaloom_guard if guard is None else guard,
        url=settings.metaloom_url,
        name=name,
        start_timeout=max(settings.metaloom_start_timeout, profile.start_timeout or 0),
        ready_timeout=max(settings.metaloom_ready_timeout, profile.start_timeout or 0),
        stop_timeout=settings.metaloom_stop_timeout,
        warmup=warmup,
        request_fields=profile.request_fields(resolve_model(request, model)),
    )
    _STARTED.add(live)
    live.start()
    return live


def mlx_server_fixture(
    *,
    scope: str = "function",
    model: str | Path | None = None,
    server_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    command: Sequence[str] | None = None,
    faults: str | None = None,
    limits: str | None = None,
    name: str = "mlx-server",
    server: str | None = None,
) -> Callable[..., Any]:
    """Return a fixture that runs one configured server for the given scope.

    ``server`` is a server profile: a built-in name or the path of a profile .toml.

    Example (in a conftest.py)::

        from pytest_metaloom.fixtures import mlx_server_fixture
        quantized_server = mlx_server_fixture(scope="module", server_args=["--kv-bits", "8"])
    """

    @pytest.fixture(scope=scope)  # type: ignore[call-overload]
    def _fixture(request: pytest.FixtureRequest) -> Iterator[Any]:
        live = start_server(
            request,
            model=model,
            server_args=server_args,
            env=env,
            command=command,
            faults=faults,
            limits=limits,
            name=name,
            server=server,
        )
        try:
            yield live
        finally:
            live.stop()

    return _fixture


@pytest.fixture(scope="session")
def metaloom_settings(request: pytest.FixtureRequest) -> Settings:
    """The resolved metaloom settings of this session."""
    return settings_of(request.config)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The built-in offline tiny llama model (built once, cached across sessions)."""
    from pytest_metaloom.server.model import ModelSpec, build_tiny_model

    return build_tiny_model(ModelSpec())


@pytest.fixture(scope="session")
def mlx_server_session(request: pytest.FixtureRequest) -> Iterator[Any]:
    """One shared server for the session; ``mlx_server`` hands it out per test."""
    server = start_server(request, name="mlx-server")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mlx_server(mlx_server_session: Any) -> Iterator[Any]:
    """A live, healthy ``mlx_lm.server`` with nothing armed.

    The session's server is reused while it stays healthy; if a previous test killed
    or wedged it, it is restarted first. Faults armed by the test are disarmed after.
    """
    server = mlx_server_session
    if server.injector is not None and not _healthy(server):
        server.restart()
    yield server
    if server.injector is not None and server.is_alive():
        with contextlib.suppress(Exception):
            server.disarm()


def _healthy(server: Any) -> bool:
    from pytest_metaloom.server.process import http_request

    if not server.is_alive():
        return False
    try:
        status, _ = http_request(server.url + "/health", timeout=5.0)
    except OSError:
        return False
    return status == 200


@pytest.fixture
def mlx_server_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """Start servers on demand inside a test; all are stopped when the test ends.

    ``mlx_server_factory(server_args=[...], faults="1*cmdbuf_oom(abort)", env={...})``
    """
    started: list[Any] = []

    def make(**kwargs: Any) -> Any:
        kwargs.setdefault("name", f"mlx-server-{len(started) + 1}")
        server = start_server(request, **kwargs)
        started.append(server)
        return server

    try:
        yield make
    finally:
        for server in started:
            with contextlib.suppress(Exception):
                server.stop()


@pytest.fixture
def metaloom_injector(mlx_server: Any) -> Any:
    """The fault-injection control of ``mlx_server``: ``arm``, ``disarm``, ``events``..."""
    if mlx_server.injector is None:
        pytest.skip("the server comes from --metaloom-url; faults cannot be injected into it")
    return mlx_server.injector
